"""Input pipeline: documents -> cached token stream -> (seq_len + 1)-token windows -> per-host batches.

Every source (the embedded Python docs, any TFDS text dataset, local .txt/.jsonl files) yields the documents
of a split. They are tokenized once, joined with EOS, and cached as a flat uint16/uint32 array keyed by a
fingerprint of (source, split, tokenizer). Training windows start every seq_len tokens and hold seq_len + 1
tokens (inputs = window[:-1], targets = window[1:], so every token is a target exactly once per epoch).
Each epoch visits the windows in a permutation seeded by (data.seed, epoch); global row r of the run is
window perm_{r // W}[r % W]. So `batch(step)` is a pure function of (data, seed, step): resuming is restarting
at the checkpointed step, and host p of P simply takes rows [p * B/P, (p+1) * B/P) of the global batch,
which is therefore the same for any number of hosts.

  python -m cla_jax.input_pipeline --config=configs/default.py   # prepare data, tokenizer and caches
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import queue
import tempfile
import threading
from typing import Iterator

import ml_collections
import numpy as np

from cla_jax import paths, python_docs
from cla_jax.errors import UserError
from cla_jax.tokenizer import Tokenizer, cache_dir_of

Batch = dict[str, np.ndarray]
_CACHE_VERSION = 1  # bump when the cache layout or document joining changes
_ENCODE_CHUNK = 256  # documents per tokenizer call


# ---------------------------------------------------------------------------------------------------------
# Sources: the documents of a split, in a fixed order, plus a fingerprint that changes when they do.


class Source:
  """A corpus whose splits are sequences of documents (strings) in a fixed order."""

  name: str

  def splits(self) -> list[str]:
    """Split names."""
    raise NotImplementedError

  def documents(self, split: str) -> Iterator[str]:
    """The documents of `split`, always in the same order."""
    raise NotImplementedError

  def fingerprint(self, split: str) -> str:
    """A string that changes whenever the documents of `split` may change."""
    raise NotImplementedError

  def check_split(self, split: str) -> None:
    """Raises a UserError naming the available splits when `split` is not one."""
    base = split.split("[")[0]  # TFDS slicing syntax, e.g. train[:10%]
    if base not in self.splits():
      raise UserError(f"{self.name} has no split {base!r}; available: {sorted(self.splits())} "
                      "(set data.train_split / data.eval_split).")


class TFDSSource(Source):
  """A prepared TFDS dataset, read without tensorflow through its array_record data source."""

  def __init__(self, builder, text_key: str):
    self._builder = builder
    self._text_key = text_key
    self.name = builder.info.full_name
    features = builder.info.features
    if hasattr(features, "keys") and text_key not in features.keys():
      raise UserError(f"{self.name} has no feature {text_key!r}; set data.text_key to one of {sorted(features.keys())}.")

  def splits(self) -> list[str]:
    return list(self._builder.info.splits.keys())

  def fingerprint(self, split: str) -> str:
    checksum = (self._builder.info.metadata or {}).get("checksum", "")
    return f"tfds:{self.name}:{split}:{self._text_key}:{checksum}"

  def documents(self, split: str) -> Iterator[str]:
    self.check_split(split)
    if str(self._builder.info.file_format).lower().endswith(("array_record", "parquet")):
      source = self._builder.as_data_source(split=split)
      for start in range(0, len(source), _ENCODE_CHUNK):
        for example in source.__getitems__(list(range(start, min(start + _ENCODE_CHUNK, len(source))))):
          yield _as_text(example[self._text_key])
      return
    if importlib.util.find_spec("tensorflow") is None:
      raise UserError(
          f"{self.name} was prepared as {self._builder.info.file_format}, which needs tensorflow to read; "
          f"delete {self._builder.data_dir} and prepare it as array_record: "
          f"{_prepare_command(self._builder.name, self._builder.data_dir_root)}")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    for example in tfds.as_numpy(self._builder.as_dataset(split=split, shuffle_files=False)):
      yield _as_text(example[self._text_key])


def _as_text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _prepare_command(name: str, data_dir) -> str:
  return (f"python -m cla_jax.input_pipeline --config.data.source=tfds --config.data.tfds_name={name} "
          f"--config.data.data_dir={data_dir}")


class TextSource(Source):
  """Local .txt files (one document each) and .jsonl files (one document per line, field data.text_key).

  The validation split is a fixed set of documents: the ceil(eval_fraction * n) whose id (path relative to
  the glob's common directory, plus `:line` for .jsonl) has the smallest sha256.
  """

  SPLITS = ("train", "validation")

  def __init__(self, pattern: str, text_key: str, eval_fraction: float):
    self._files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not self._files:
      raise UserError(f"data.text_glob={pattern!r} matches no files; give a glob of .txt / .jsonl files.")
    bad = [f for f in self._files if not f.endswith((".txt", ".jsonl"))]
    if bad:
      raise UserError(f"data.text_glob matches {bad[0]!r}; only .txt and .jsonl files are supported.")
    if not 0 <= eval_fraction < 1:
      raise UserError(f"data.eval_fraction={eval_fraction} must be in [0, 1).")
    self.name = f"text:{pattern}"
    self._text_key = text_key
    self._eval_fraction = eval_fraction
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in self._files])
    self._rel = {f: os.path.relpath(os.path.abspath(f), root) for f in self._files}
    self._held_out = None

  def splits(self) -> list[str]:
    return list(self.SPLITS)

  def fingerprint(self, split: str) -> str:
    # Names, sizes and mtimes: cheap for large corpora, and any edit changes them.
    digest = hashlib.sha256(f"{self._text_key}|{self._eval_fraction}".encode())
    for f in self._files:
      stat = os.stat(f)
      digest.update(f"{self._rel[f]}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"text:{split}:{digest.hexdigest()}"

  def _items(self) -> Iterator[tuple[str, str]]:
    """(document id, text) over all files, in file then line order."""
    for f in self._files:
      rel = self._rel[f]
      if f.endswith(".txt"):
        yield rel, pathlib.Path(f).read_text(encoding="utf-8", errors="replace")
        continue
      with open(f, encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise UserError(f"{f}:{lineno} is not valid JSON ({e.msg}).") from None
          if not isinstance(record, dict) or self._text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{f}:{lineno} has no field {self._text_key!r} (has {keys}); set data.text_key.")
          yield f"{rel}:{lineno}", str(record[self._text_key])

  def documents(self, split: str) -> Iterator[str]:
    self.check_split(split)
    if self._held_out is None:
      self._held_out = python_docs.validation_files([doc_id for doc_id, _ in self._items()], self._eval_fraction)
    want_eval = split == "validation"
    for doc_id, text in self._items():
      if (doc_id in self._held_out) == want_eval:
        yield text


def _tfds_builder(name: str, data_dir: str):
  """The TFDS builder for `name`, with a clear error (and the prepare command) when it is not prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name:
    raise UserError("data.source=tfds needs data.tfds_name, e.g. --config.data.tfds_name=lm1b.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"data.tfds_name={name!r} is not a TFDS dataset; see `tfds.list_builders()`.") from None
  if not builder.is_prepared():
    raise UserError(f"TFDS dataset {name} is not prepared in {data_dir}; prepare it with: "
                    f"{_prepare_command(name, data_dir)}")
  return builder


def get_source(config: ml_collections.ConfigDict) -> Source:
  """The Source named by config.data.source."""
  data = config.data
  data_dir = _data_dir(config)
  if data.source == "python_docs":
    if python_docs.find_sources(data_dir) is None and not python_docs.builder(data_dir).is_prepared():
      raise UserError(f"the default corpus ({python_docs.PACKAGE}) is missing; run "
                      f"`bash scripts/get_python_docs.sh {data.data_dir}` (installs or downloads it).")
    return TFDSSource(python_docs.prepare(data_dir), "text")
  if data.source == "tfds":
    return TFDSSource(_tfds_builder(str(data.tfds_name), data_dir), str(data.text_key))
  if data.source == "text":
    return TextSource(str(data.text_glob), str(data.text_key), float(data.eval_fraction))
  raise UserError(f"data.source={data.source!r} is not one of 'python_docs', 'tfds', 'text'.")


def _data_dir(config: ml_collections.ConfigDict) -> str:
  data_dir = str(config.data.data_dir)
  return data_dir if paths.is_remote(data_dir) else os.path.expanduser(data_dir)


# ---------------------------------------------------------------------------------------------------------
# Token caches: a split as one flat array of ids, each document followed by EOS.


def _resolve_split(config: ml_collections.ConfigDict, split: str) -> str:
  """'train' and 'validation' name the configured data.train_split and data.eval_split; others are literal."""
  if split == "train":
    return str(config.data.train_split)
  if split == "validation":
    return str(config.data.eval_split)
  return split


def load_tokens(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str,
                source: Source | None = None) -> np.ndarray:
  """The split's EOS-joined token stream (read-only memmap), tokenizing and caching it on first use."""
  source = source or get_source(config)
  source.check_split(split)
  max_tokens = int(config.data.get("max_cache_tokens", 0) or 0)
  key = f"v{_CACHE_VERSION}|{source.fingerprint(split)}|{tokenizer.checksum}|max={max_tokens}"
  fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
  base = cache_dir_of(config) / "tokens" / fingerprint
  meta_path = base.with_suffix(".json")
  if not meta_path.exists():
    logging.info("tokenizing %s %s into %s", source.name, split, base)
    _write_cache(source.documents(split), tokenizer, base, max_tokens,
                 {"source": source.name, "split": split, "key": key, "tokenizer": tokenizer.description})
  meta = json.loads(meta_path.read_text())
  if meta["num_tokens"] == 0:
    return np.zeros((0,), np.dtype(meta["dtype"]))
  return np.memmap(base.with_suffix(".bin"), dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))


def _write_cache(documents: Iterator[str], tokenizer: Tokenizer, base: pathlib.Path, max_tokens: int,
                 info: dict) -> None:
  """Streams token ids to base.bin, then writes base.json; both by rename, so readers never see partial files."""
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
  base.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=base.parent, prefix=base.name + ".bin.tmp")
  num_tokens = num_docs = 0
  with os.fdopen(fd, "wb") as out:
    def flush(chunk: list[str]) -> bool:
      nonlocal num_tokens, num_docs
      for ids in tokenizer.encode_batch(chunk):
        ids = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
        if max_tokens:
          ids = ids[:max_tokens - num_tokens]
        out.write(ids.tobytes())
        num_tokens += ids.size
        num_docs += 1
        if max_tokens and num_tokens >= max_tokens:
          return False
      return True

    chunk: list[str] = []
    for doc in documents:
      chunk.append(doc)
      if len(chunk) == _ENCODE_CHUNK:
        if not flush(chunk):
          chunk = []
          break
        chunk = []
    if chunk:
      flush(chunk)
  os.replace(tmp, base.with_suffix(".bin"))
  meta = dict(info, dtype=np.dtype(dtype).name, num_tokens=num_tokens, num_docs=num_docs)
  fd, tmp = tempfile.mkstemp(dir=base.parent, prefix=base.name + ".json.tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, base.with_suffix(".json"))


# ---------------------------------------------------------------------------------------------------------
# Batches.


def packing_features(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """segment_ids (1, 2, ... per window row) and positions (from 0 in each segment) for packed inputs.

  A segment starts at every EOS *input*: EOS closes a document as a target and then acts as the BOS of the
  next one. So no target crosses a document boundary (the last token of a document predicts EOS inside
  its own segment; EOS predicts the next document's first token with no earlier context) and every target
  keeps weight 1. A window's first segment is the tail of a document cut by the window, from position 0.
  """
  starts = inputs == eos_id
  starts[:, 0] = True
  segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
  index = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
  segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return segment_ids, (index - segment_start).astype(np.int32)


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count}).")
  return process_index, process_count


def _local_rows(batch_size: int, process_index: int, process_count: int, what: str) -> int:
  if batch_size % process_count:
    raise UserError(f"{what}={batch_size} must be divisible by the number of hosts ({process_count}); "
                    f"use a multiple of {process_count}.")
  return batch_size // process_count


def _batch_from_windows(windows: np.ndarray, weights: np.ndarray, packing: bool, eos_id: int) -> Batch:
  """The batch dict of [rows, seq_len + 1] windows and [rows, seq_len] target weights."""
  inputs = windows[:, :-1].astype(np.int32)
  batch = {"inputs": inputs, "targets": windows[:, 1:].astype(np.int32), "weights": weights.astype(np.float32)}
  if packing:
    segment_ids, positions = packing_features(inputs, eos_id)
    padding = weights == 0
    # Padding gets its own segment id 0 and position 0, so real tokens never attend to it.
    batch["segment_ids"] = np.where(padding, 0, segment_ids).astype(np.int32)
    batch["positions"] = np.where(padding, 0, positions).astype(np.int32)
  return batch


class TrainBatches:
  """Step-indexed training batches: `batch(step)` is this host's rows of global batch `step`."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str = "train",
               process_index: int | None = None, process_count: int | None = None):
    self.process_index, self.process_count = _host(process_index, process_count)
    self.global_batch = int(config.train.batch_size)
    self.local_batch = _local_rows(self.global_batch, self.process_index, self.process_count, "train.batch_size")
    self.seq_len = int(config.train.seq_len)
    self.seed = int(config.data.seed)
    self.packing = bool(config.data.packing)
    self.prefetch = max(0, int(config.data.prefetch))
    self.eos_id = tokenizer.eos_id
    self.split = _resolve_split(config, split)
    self.tokens = load_tokens(config, tokenizer, self.split)
    self.num_windows = (len(self.tokens) - 1) // self.seq_len if len(self.tokens) else 0
    if self.num_windows == 0:
      raise UserError(f"the {self.split} split has {len(self.tokens)} tokens, fewer than train.seq_len + 1 = "
                      f"{self.seq_len + 1}; use more data or a shorter seq_len.")
    self._offsets = np.arange(self.seq_len + 1)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  @property
  def steps_per_epoch(self) -> float:
    """Global batches per pass over the training windows."""
    return self.num_windows / self.global_batch

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:  # a batch spans at most two epochs
          del self._perms[min(self._perms)]
        self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      return self._perms[epoch]

  def window_indices(self, step: int) -> np.ndarray:
    """Indices (into the split's windows) of this host's rows of global batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    rows = step * self.global_batch + self.process_index * self.local_batch + np.arange(self.local_batch)
    epochs, within = np.divmod(rows, self.num_windows)
    return np.array([self._permutation(int(e))[i] for e, i in zip(epochs, within)], dtype=np.int64)

  def batch(self, step: int) -> Batch:
    """This host's rows of global batch `step` (a pure function of data, seed and step)."""
    starts = self.window_indices(step) * self.seq_len
    windows = np.asarray(self.tokens[starts[:, None] + self._offsets])
    weights = np.ones((self.local_batch, self.seq_len), np.float32)
    return _batch_from_windows(windows, weights, self.packing, self.eos_id)

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """batch(start_step), batch(start_step + 1), ..., prepared `data.prefetch` steps ahead in a thread."""
    if self.prefetch == 0:
      step = start_step
      while True:
        yield self.batch(step)
        step += 1
    yield from _prefetched(self.batch, start_step, self.prefetch)


def _prefetched(make_batch, start_step: int, depth: int) -> Iterator[Batch]:
  """Runs make_batch(start_step), make_batch(start_step + 1), ... in a daemon thread, `depth` ahead."""
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def worker():
    step = start_step
    while not stop.is_set():
      try:
        item = (make_batch(step), None)
      except Exception as e:  # pylint: disable=broad-except  # re-raised in the consumer
        item = (None, e)
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[1] is not None:
        return
      step += 1

  thread = threading.Thread(target=worker, daemon=True, name="cla-input-prefetch")
  thread.start()
  try:
    while True:
      batch, error = ready.get()
      if error is not None:
        raise error
      yield batch
  finally:
    stop.set()


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, batch_size: int, max_tokens: int,
                 split: str | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """This host's rows of the validation batches: consecutive windows in order, the first max_tokens targets.

  The stream's targets (every token after the first) are scored once each, seq_len per row; the last row
  and the last batch are padded with weights 0. max_tokens <= 0 scores the whole split.
  """
  process_index, process_count = _host(process_index, process_count)
  local = _local_rows(int(batch_size), process_index, process_count, "eval batch_size")
  seq_len = int(config.train.seq_len)
  split = _resolve_split(config, split or "validation")
  tokens = load_tokens(config, tokenizer, split)
  total = max(len(tokens) - 1, 0)
  if max_tokens and max_tokens > 0:
    total = min(total, int(max_tokens))
  if total == 0:
    raise UserError(f"the {split} split is empty; add data or raise data.eval_fraction (for data.source=text).")
  num_rows = math.ceil(total / seq_len)
  num_batches = math.ceil(num_rows / batch_size)
  offsets = np.arange(seq_len + 1)
  for b in range(num_batches):
    rows = b * batch_size + process_index * local + np.arange(local)
    positions = rows[:, None] * seq_len + offsets  # window token positions in the stream
    # A window position is real when it exists and, for targets, lies within the first `total` targets.
    real = positions[:, 1:] <= total
    windows = np.asarray(tokens[np.minimum(positions, len(tokens) - 1)]).astype(np.int64)
    windows[:, 1:] = np.where(real, windows[:, 1:], 0)
    windows[:, 0] = np.where(real[:, 0], windows[:, 0], 0)
    yield _batch_from_windows(windows, real.astype(np.float32), bool(config.data.packing), tokenizer.eos_id)


# ---------------------------------------------------------------------------------------------------------
# CLI: prepare everything a config needs (TFDS download + array_record, tokenizer, token caches).


def prepare(config: ml_collections.ConfigDict) -> dict:
  """Prepares the config's data, tokenizer and token caches; returns a summary."""
  from cla_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(str(config.data.tfds_name), data_dir=_data_dir(config), file_format="array_record")
    if not builder.is_prepared():
      try:
        builder.download_and_prepare()
      except OSError as e:  # network / storage failures: one line, not a traceback
        raise UserError(f"preparing TFDS {config.data.tfds_name} in {_data_dir(config)} failed: {e}".replace("\n", " ")
                        ) from None
  elif config.data.source == "python_docs":
    python_docs.fetch_sources(_data_dir(config))
  tok = tokenizer_lib.get_tokenizer(config)
  summary = {"tokenizer": tok.description, "vocab_size": tok.vocab_size}
  for split in (config.data.train_split, config.data.eval_split):
    tokens = load_tokens(config, tok, str(split))
    summary[f"{split}_tokens"] = int(len(tokens))
  return summary


def main(argv: list[str]) -> None:
  del argv
  print(json.dumps(prepare(_CONFIG.value), indent=1))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from cla_jax import cli  # pylint: disable=g-import-not-at-top
  from cla_jax import config_lib  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", str(config_lib.REPO_ROOT / "configs" / "default.py"),
                                            "Experiment config whose data to prepare.")
  cli.run(main)
