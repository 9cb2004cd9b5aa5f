"""The prepare step: tokenize a corpus once, in parallel, into prepared splits (format: `cla_jax.data.reader`).

  cla-prepare --config=configs/paper_1b.py:H128-MQA-CLA2 --output=DIR_OR_BUCKET \
      [--num_workers=N] [--shard=i --num_shards=k]

Two phases, both split into independent tasks and both resumable (every file is written atomically and a
task whose file exists is skipped, so a killed run continues where it stopped and writes the same bytes):

1. Tokenize: the split's documents, in chunks (at least MIN_CHUNKS of them, see `chunk_size`), each into
   `work/chunk-NNNNNN.bin` (the chunk's documents, each followed by EOS) in N worker processes.
2. Window: once every chunk is there, the token counts fix every window's place in the stream; each
   ArrayRecord shard of windows is cut from the chunks it overlaps, again in N processes. Then `index.json`.

`--shard=i --num_shards=k` does the tasks i, i + k, ... of each phase, so k hosts (sharing the output
bucket) prepare one corpus together: run the same command on every host, then once more after all of them
finished phase 1 (a run that finds chunks missing does what it can and says so). When no
`data.prepared_dir` is set, training prepares its splits itself through `open_split`, in one worker, into
the cache directory: the same code, so a small corpus needs no extra command.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from cla_jax import paths
from cla_jax.data import python_docs, reader, sources, splits, writer
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError

# Documents per tokenization task: at most MAX_DOCS_PER_CHUNK, and few enough that a split makes at least
# MIN_CHUNKS tasks, so workers finish together. Decided from the document count alone (and kept in the plan),
# so a resumed run finds the same chunks; the prepared bytes never depend on it.
MAX_DOCS_PER_CHUNK = 2000
MIN_CHUNKS = 64
WORK_DIR = "work"


def split_dirname(split: str) -> str:
  """The directory name of a split (TFDS slicing such as `train[:10%]` made file-safe)."""
  return re.sub(r"[^\w.-]+", "_", split).strip("_") or "split"


def split_key(
    source: sources.Source, split: str, tokenizer: tokenizer_lib.Tokenizer, seq_len: int, max_tokens: int
) -> dict[str, Any]:
  """Everything that decides a prepared split's bytes (recorded in its index and checked on reuse)."""
  return {
      "format_version": reader.FORMAT_VERSION,
      "source": source.name,
      "split": split,
      "corpus_fingerprint": source.fingerprint(split),
      "tokenizer_checksum": tokenizer.checksum,
      "seq_len": int(seq_len),
      "max_tokens": int(max_tokens),
  }


def chunk_size(num_documents: int) -> int:
  """Documents per tokenization task for a split of `num_documents` (see MIN_CHUNKS)."""
  return max(1, min(MAX_DOCS_PER_CHUNK, num_documents // MIN_CHUNKS))


def _expand(path: str) -> epath.Path:
  return epath.Path(path if paths.is_remote(path) else os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------------------
# Tasks. Each runs in the calling process (one worker) or in a spawned worker process; a worker gets the
# source (pickled) and builds the tokenizer from the tokenizer file, once.

_WORKER_STATE: dict[str, Any] = {}


def _init_worker(source: sources.Source, tokenizer_bytes: bytes, tokenizer_path: str) -> None:
  _WORKER_STATE["source"] = source  # pickled with its document list: a worker does not list the corpus again
  tokenizer = tokenizer_lib.from_file_bytes(tokenizer_bytes, tokenizer_path)
  tokenizer.threads = 1  # one core per worker process: parallelism comes from the processes
  _WORKER_STATE["tokenizer"] = tokenizer


def _tokenize_chunk(
    split: str,
    start: int,
    stop: int,
    path: str,
    dtype: str,
    source: sources.Source | None = None,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
) -> None:
  """Writes documents [start, stop) of `split`, each followed by EOS, to `path` (+ .json with the counts)."""
  source = source or _WORKER_STATE["source"]
  tokenizer = tokenizer or _WORKER_STATE["tokenizer"]
  pieces, num_docs, batch = [], 0, []

  def flush():
    nonlocal num_docs
    for ids in tokenizer.encode_batch(batch):
      pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
      num_docs += 1
    batch.clear()

  for doc in source.documents(split, start, stop):
    batch.append(doc)
    if len(batch) == 256:
      flush()
  flush()
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  path = epath.Path(path)
  writer.atomic_write(path, tokens.tofile)
  # The .json is the chunk's completion mark: written after its tokens.
  writer.write_json(path.with_suffix(".json"), {"num_tokens": int(tokens.size), "num_documents": num_docs})


def _read_tokens(work: epath.Path, offsets: list[int], start: int, stop: int, dtype: str) -> np.ndarray:
  """Tokens [start, stop) of the stream, from the chunk files that overlap it."""
  parts = []
  first = max(0, int(np.searchsorted(offsets, start, side="right")) - 1)
  for chunk in range(first, len(offsets) - 1):
    lo, hi = offsets[chunk], offsets[chunk + 1]
    if lo >= stop:
      break
    if hi <= start:
      continue
    tokens = np.frombuffer((work / _chunk_name(chunk)).read_bytes(), dtype=dtype)
    parts.append(tokens[max(start, lo) - lo : min(stop, hi) - lo])
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def _write_window_shard(
    directory: str,
    shard: int,
    num_shards: int,
    per_shard: int,
    offsets: list[int],
    seq_len: int,
    num_tokens: int,
    num_windows: int,
    num_records: int,
    dtype: str,
) -> None:
  """Writes records [shard * per_shard, ...) of the split: windows, and the tail in the last record."""
  directory = epath.Path(directory)
  first, last = shard * per_shard, min((shard + 1) * per_shard, num_records)
  tokens = _read_tokens(directory / WORK_DIR, offsets, first * seq_len, min(last * seq_len + 1, num_tokens), dtype)
  records = []
  for r in range(first, last):
    lo = (r - first) * seq_len
    records.append(tokens[lo : lo + seq_len + 1] if r < num_windows else tokens[lo:])
  writer.write_shard(directory / reader.shard_name(shard, num_shards), records)


def _chunk_name(chunk: int) -> str:
  return f"chunk-{chunk:06d}.bin"


class Workers:
  """Runs tasks in this process and, for num_workers > 1, in num_workers - 1 spawned worker processes.

  This process works too (its source and tokenizer are loaded already, and the helpers start while it works);
  the helpers start on first use and serve every split and phase of a `prepare` run.
  """

  def __init__(self, num_workers: int, source: sources.Source, tokenizer: tokenizer_lib.Tokenizer):
    self.num_workers = num_workers
    self._state = {"source": source, "tokenizer": tokenizer}
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None

  def map(self, fn, tasks: list[dict], uses_state: bool = True) -> None:
    """Calls fn(**task) for every task, in any order and in parallel; re-raises the first error.

    `uses_state`: fn takes the source and tokenizer (a helper's own, or this process's).
    """
    local = self._state if uses_state else {}
    pending = list(reversed(tasks))
    if self.num_workers <= 1 or len(tasks) == 1:
      while pending:
        fn(**pending.pop(), **local)
      return
    pool = self._helpers()
    running: set[concurrent.futures.Future] = set()
    while pending or running:
      # Two queued per helper, so a helper never waits for this process to hand it the next task.
      while pending and len(running) < 2 * (self.num_workers - 1):
        running.add(pool.submit(fn, **pending.pop()))
      if pending:
        fn(**pending.pop(), **local)
        done = {f for f in running if f.done()}
      else:
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        future.result()
      running -= done

  def _helpers(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._pool is None:
      tokenizer = self._state["tokenizer"]
      # spawn, not fork: the caller may hold threads (JAX, TFDS) that a forked child would inherit half-way.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.num_workers - 1,
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker,
          initargs=(self._state["source"], tokenizer.file_bytes(), tokenizer.filename),
      )
    return self._pool

  def close(self) -> None:
    """Stops the helpers (tasks not started yet are dropped: after an error, their files are just missing)."""
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)
      self._pool = None


# ---------------------------------------------------------------------------------------------------------
# One split.


@contextlib.contextmanager
def _one_thread(tokenizer: tokenizer_lib.Tokenizer):
  """Runs the block with the tokenizer on one thread, then restores its thread count."""
  threads, tokenizer.threads = tokenizer.threads, 1
  try:
    yield
  finally:
    tokenizer.threads = threads


def prepare_split(
    config: ml_collections.ConfigDict,
    source: sources.Source,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str,
    directory: str | os.PathLike,
    *,
    seq_len: int,
    num_workers: int = 1,
    shard: int = 0,
    num_shards: int = 1,
    docs_per_chunk: int = 0,
    records_per_shard: int = 0,
    keep_work: bool = False,
    workers: Workers | None = None,
) -> dict | None:
  """Prepares `split` in windows of `seq_len` + 1 into `directory`: its index, or None while shards are missing."""
  directory = epath.Path(directory)
  max_tokens = int(config.data.max_cache_tokens)
  key = split_key(source, split, tokenizer, seq_len, max_tokens)
  index = reader.read_index(directory)
  if index is not None:
    _check_same(directory, index["key"], key)
    return index
  source.check_split(split)
  work = directory / WORK_DIR
  num_docs = source.num_documents(split)
  plan = {"key": key, "num_documents": num_docs, "docs_per_chunk": int(docs_per_chunk or chunk_size(num_docs))}
  if (work / "plan.json").exists():
    _check_same(work, json.loads((work / "plan.json").read_text())["key"], key)
    plan = json.loads((work / "plan.json").read_text())  # a resumed run keeps the first run's chunking
  else:
    writer.write_json(work / "plan.json", plan)
  dtype = reader.token_dtype(tokenizer.vocab_size).name
  own_workers = workers is None
  workers = workers or Workers(num_workers, source, tokenizer)
  with _one_thread(tokenizer), contextlib.ExitStack() as stack:  # one core per worker, in this process too
    if own_workers:
      stack.callback(workers.close)
    # The two phases (see the module docstring).
    num_chunks = math.ceil(plan["num_documents"] / plan["docs_per_chunk"])
    starts = [min(c * plan["docs_per_chunk"], plan["num_documents"]) for c in range(num_chunks + 1)]

    # Phase 1: tokenize the chunks (in order, in waves, when max_tokens may stop it early).
    mine = [c for c in range(num_chunks) if c % num_shards == shard]
    wave = max(1, workers.num_workers) * 2 if max_tokens and num_shards == 1 else len(mine)
    for first in range(0, len(mine), max(wave, 1)):
      todo = [
          dict(split=split, start=starts[c], stop=starts[c + 1], path=str(work / _chunk_name(c)), dtype=dtype)
          for c in mine[first : first + wave]
          if not (work / _chunk_name(c)).with_suffix(".json").exists()
      ]
      logging.info("tokenizing %d chunks of %s %s into %s", len(todo), source.name, split, work)
      workers.map(_tokenize_chunk, todo)
      if max_tokens and sum(_done_prefix(work, num_chunks)) >= max_tokens:
        break  # the cap is reached: later chunks are never read
    counts = _done_prefix(work, num_chunks)
    if len(counts) < num_chunks and not (max_tokens and sum(counts) >= max_tokens):
      done = sum((work / _chunk_name(c)).with_suffix(".json").exists() for c in range(num_chunks))
      print(f"{directory}: {done} of {num_chunks} chunks tokenized; rerun once every shard's run has finished.")
      return None

    # Phase 2: cut the stream into windows and write the shards.
    offsets = [0, *np.cumsum(counts).tolist()]
    num_tokens = min(offsets[-1], max_tokens) if max_tokens else offsets[-1]
    num_windows = (num_tokens - 1) // seq_len if num_tokens else 0
    has_tail = num_tokens - 1 > num_windows * seq_len
    num_records = num_windows + int(has_tail)
    per_shard = records_per_shard or writer.records_per_shard(num_records, seq_len, np.dtype(dtype))
    num_out = math.ceil(num_records / per_shard)
    todo = [
        dict(
            directory=str(directory),
            shard=j,
            num_shards=num_out,
            per_shard=per_shard,
            offsets=offsets,
            seq_len=seq_len,
            num_tokens=num_tokens,
            num_windows=num_windows,
            num_records=num_records,
            dtype=dtype,
        )
        for j in range(num_out)
        if j % num_shards == shard and not (directory / reader.shard_name(j, num_out)).exists()
    ]
    workers.map(_write_window_shard, todo, uses_state=False)
    if not all((directory / reader.shard_name(j, num_out)).exists() for j in range(num_out)):
      print(f"{directory}: window shards of other hosts are missing; rerun once every shard's run has finished.")
      return None
    shard_list = [
        {"file": reader.shard_name(j, num_out), "num_records": min((j + 1) * per_shard, num_records) - j * per_shard}
        for j in range(num_out)
    ]
    index = {
        **key,
        "key": key,
        "tokenizer": tokenizer.description,
        "dtype": dtype,
        "num_documents": plan["num_documents"],
        "num_tokens": num_tokens,
        "num_windows": num_windows,
        "num_records": num_records,
        "shards": shard_list,
    }
    writer.write_json(directory / reader.INDEX_FILE, index)
    if not keep_work:
      _remove(work)
    return index


def _check_same(where: epath.Path, found: dict, wanted: dict) -> None:
  if found != wanted:
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    raise UserError(
        f"{where} holds data prepared differently ({', '.join(changed)} differ); delete it or prepare "
        "into another directory."
    )


def _done_prefix(work: epath.Path, num_chunks: int) -> list[int]:
  """Token counts of the leading chunks that are tokenized (all of them when the phase is complete)."""
  counts = []
  for c in range(num_chunks):
    meta = (work / _chunk_name(c)).with_suffix(".json")
    if not meta.exists():
      break
    counts.append(json.loads(meta.read_text())["num_tokens"])
  return counts


def _remove(path: epath.Path) -> None:
  if paths.is_remote(str(path)):
    path.rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# What training and evaluation call.


def open_split(
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str | None,
    seq_len: int,
    check_seq_len: bool = True,
) -> reader.PreparedSplit:
  """The prepared split ('train', 'validation' or a literal name): from data.prepared_dir, else prepared here.

  With data.prepared_dir set nothing is tokenized: the split must be there, made with this tokenizer (and, with
  `check_seq_len`, in windows of `seq_len`). Without it the split is prepared on first use, in this process, in
  windows of `seq_len`, into cache_dir/prepared/<fingerprint>.
  """
  split = splits.resolve_split(config, split)
  prepared_dir = str(config.data.prepared_dir)
  if prepared_dir:
    directory = _expand(prepared_dir) / split_dirname(split)
    if reader.read_index(directory) is None:
      raise UserError(
          f"data.prepared_dir={prepared_dir!r} has no prepared {split!r} split ({directory}/index.json "
          f"missing); prepare it with `python -m cla_jax.cli.prepare --config=... "
          f"--output={prepared_dir}`."
      )
  else:
    source = sources.get_source(config)
    source.check_split(split)
    key = split_key(source, split, tokenizer, seq_len, int(config.data.max_cache_tokens))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = tokenizer_lib.cache_dir_of(config) / "prepared" / f"{split_dirname(split)}-{digest}"
    # Kept work files let concurrent processes preparing the same cache never lose a chunk they read.
    prepare_split(config, source, tokenizer, split, directory, seq_len=seq_len, num_workers=1, keep_work=True)
  data = reader.PreparedSplit(directory)
  if data.tokenizer_checksum != tokenizer.checksum:
    raise UserError(
        f"{directory} was prepared with another tokenizer ({data.index.get('tokenizer')}) than "
        f"{tokenizer.description}; prepare it again or use the tokenizer it was prepared with."
    )
  if check_seq_len and data.seq_len != int(seq_len):
    raise UserError(
        f"{directory} holds windows of train.seq_len={data.seq_len}, not {seq_len}; set "
        f"--config.train.seq_len={data.seq_len} or prepare again."
    )
  return data


# ---------------------------------------------------------------------------------------------------------
# CLI.


def prepare(
    config: ml_collections.ConfigDict,
    output: str = "",
    num_workers: int = 1,
    shard: int = 0,
    num_shards: int = 1,
    docs_per_chunk: int = 0,
    records_per_shard: int = 0,
) -> dict:
  """Prepares the config's corpus (TFDS download, tokenizer, both splits) into `output`; returns a summary.

  Without `output` the splits go where training looks for them when data.prepared_dir is unset (the cache).
  """
  if not 0 <= shard < num_shards:
    raise UserError(f"--shard={shard} must lie in [0, --num_shards={num_shards}).")
  if num_workers < 1:
    raise UserError(f"--num_workers={num_workers} must be at least 1.")
  if config.data.prepared_dir:
    raise UserError("data.prepared_dir names a prepared dataset to read; to prepare, pass --output=DIR instead.")
  if output:
    paths.check_output_dir(output, "--output")  # before the download and the tokenizer, not as FileExistsError
  _fetch(config)
  tokenizer = tokenizer_lib.get_tokenizer(config)
  tokenizer_lib.fitted_vocab_size(tokenizer, config.model.vocab_size, config.data.pad_vocab)  # refuses a mismatch
  seq_len = int(config.train.seq_len)  # the experiment's windows: what its training will open
  source = sources.get_source(config)
  summary: dict[str, Any] = {"tokenizer": tokenizer.description, "vocab_size": tokenizer.vocab_size}
  if output:
    root = _expand(output)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(root)
  with contextlib.closing(Workers(num_workers, source, tokenizer)) as workers:
    for name in (config.data.train_split, config.data.eval_split):
      split = str(name)
      if not output:
        data = open_split(config, tokenizer, split, seq_len)
        summary[split] = {"dir": str(data.directory), "tokens": data.num_tokens, "windows": data.num_windows}
        continue
      directory = root / split_dirname(split)
      index = prepare_split(
          config,
          source,
          tokenizer,
          split,
          directory,
          seq_len=seq_len,
          shard=shard,
          num_shards=num_shards,
          docs_per_chunk=docs_per_chunk,
          records_per_shard=records_per_shard,
          workers=workers,
      )
      summary[split] = (
          {"dir": str(directory), "tokens": index["num_tokens"], "windows": index["num_windows"]}
          if index
          else {"dir": str(directory), "incomplete": True}
      )
  if output:
    summary["train_with"] = f"--config.data.prepared_dir={output}"
  return summary


def _fetch(config: ml_collections.ConfigDict) -> None:
  """Downloads and prepares the raw corpus when it is a TFDS dataset or the default docs."""
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (sources imports it anyway)

    builder = tfds.builder(str(config.data.tfds_name), data_dir=sources.data_dir_of(config), file_format="array_record")
    if not builder.is_prepared():
      try:
        builder.download_and_prepare()
      except OSError as e:  # network / storage failures: one line, not a traceback
        raise UserError(
            f"preparing TFDS {config.data.tfds_name} in {sources.data_dir_of(config)} failed: "
            f"{e}".replace("\n", " ")
        ) from None
  elif config.data.source == "python_docs" and not python_docs.builder(sources.data_dir_of(config)).is_prepared():
    python_docs.fetch_sources(sources.data_dir_of(config))
