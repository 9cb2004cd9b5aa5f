"""Sources: the documents of a split, in a fixed order, with a fingerprint that changes when they do.

`get_source(config)` picks one by `data.source`: the embedded Python docs and any TFDS text dataset (both read
through TFDS's array_record data source, without tensorflow), or local .txt / .jsonl files. Documents can be
read from any position (`documents(split, start, stop)`), so the prepare step can split a corpus between
worker processes.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import os
from collections.abc import Iterator

import ml_collections
import tensorflow_datasets as tfds

from cla_jax import paths
from cla_jax.data import python_docs, splits
from cla_jax.errors import UserError

_READ_CHUNK = 256  # TFDS examples per random-access read


class Source:
  """A corpus whose splits are sequences of documents (strings) in a fixed order."""

  name: str

  def splits(self) -> list[str]:
    """Split names."""
    raise NotImplementedError

  def num_documents(self, split: str) -> int:
    """How many documents `split` has."""
    raise NotImplementedError

  def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents [start, stop) of `split`, always in the same order."""
    raise NotImplementedError

  def fingerprint(self, split: str) -> str:
    """A string that changes whenever the documents of `split` may change."""
    raise NotImplementedError

  def check_split(self, split: str) -> None:
    """Raises a UserError naming the available splits when `split` is not one."""
    base = split.split("[")[0]  # TFDS slicing syntax, e.g. train[:10%]
    if base not in self.splits():
      raise UserError(
          f"{self.name} has no split {base!r}; available: {sorted(self.splits())} "
          "(set data.train_split / data.eval_split)."
      )


class TFDSSource(Source):
  """A prepared TFDS dataset, read without tensorflow through its array_record data source."""

  def __init__(self, builder, text_key: str):
    self._builder = builder
    self._text_key = text_key
    self.name = builder.info.full_name
    features = builder.info.features
    if hasattr(features, "keys") and text_key not in features.keys():
      raise UserError(
          f"{self.name} has no feature {text_key!r}; set data.text_key to one of {sorted(features.keys())}."
      )
    self._data_sources = {}

  def __getstate__(self) -> dict:
    # Open data sources stay behind: a worker process that gets this source opens its own.
    return {**self.__dict__, "_data_sources": {}}

  def splits(self) -> list[str]:
    return list(self._builder.info.splits.keys())

  def fingerprint(self, split: str) -> str:
    checksum = (self._builder.info.metadata or {}).get("checksum", "")
    return f"tfds:{self.name}:{split}:{self._text_key}:{checksum}"

  def _random_access(self) -> bool:
    return str(self._builder.info.file_format).lower().endswith(("array_record", "parquet"))

  def _data_source(self, split: str):
    if split not in self._data_sources:
      self._data_sources[split] = self._builder.as_data_source(split=split)
    return self._data_sources[split]

  def num_documents(self, split: str) -> int:
    self.check_split(split)
    if self._random_access():
      return len(self._data_source(split))
    return self._builder.info.splits[split].num_examples

  def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    self.check_split(split)
    if self._random_access():
      source = self._data_source(split)
      stop = len(source) if stop is None else min(stop, len(source))
      for first in range(start, stop, _READ_CHUNK):
        for example in source.__getitems__(list(range(first, min(first + _READ_CHUNK, stop)))):
          yield _as_text(example[self._text_key])
      return
    if importlib.util.find_spec("tensorflow") is None:
      raise UserError(
          f"{self.name} was prepared as {self._builder.info.file_format}, which needs tensorflow to read; "
          f"delete {self._builder.data_dir} and prepare it as array_record: "
          f"{prepare_command(self._builder.name, self._builder.data_dir_root)}"
      )
    examples = tfds.as_numpy(self._builder.as_dataset(split=split, shuffle_files=False))
    for example in itertools.islice(examples, start, stop):
      yield _as_text(example[self._text_key])


def _as_text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def prepare_command(name: str, data_dir) -> str:
  """The command that downloads and prepares TFDS dataset `name` (and tokenizes it)."""
  return (
      f"python -m cla_jax.cli.prepare --config.data.source=tfds --config.data.tfds_name={name} "
      f"--config.data.data_dir={data_dir}"
  )


def _read_utf8(path: str) -> str:
  """A file's text; binary or non-UTF-8 files are refused rather than read as replacement characters."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    if b"\0" in data:
      raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(
        f"{path} is not UTF-8 text (byte {e.start}: {e.reason}; a binary file?); remove it from "
        "data.text_glob or convert it to UTF-8."
    ) from None


class TextSource(Source):
  """Local .txt files (one document each) and .jsonl files (one document per line, field data.text_key).

  The validation split is a fixed set of documents: the ceil(eval_fraction * n) whose id (path relative to
  the glob's common directory, plus `:line` for .jsonl) has the smallest sha256; none when eval_fraction is 0.
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
    self._ids: dict[str, list[tuple[str, int]]] | None = None

  def splits(self) -> list[str]:
    return list(self.SPLITS)

  def fingerprint(self, split: str) -> str:
    # Names, sizes and mtimes: cheap for large corpora, and any edit changes them.
    digest = hashlib.sha256(f"{self._text_key}|{self._eval_fraction}".encode())
    for f in self._files:
      stat = os.stat(f)
      digest.update(f"{self._rel[f]}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"text:{split}:{digest.hexdigest()}"

  def _split_ids(self, split: str) -> list[tuple[str, int]]:
    """(file, line number; 0 for a .txt file) of each document of `split`, in file then line order."""
    if self._ids is None:
      all_ids = []
      for f in self._files:
        # Every file is decoded here, whichever split it falls in: a bad file in the validation split
        # would otherwise pass unseen whenever evaluation is off.
        text = _read_utf8(f)
        if f.endswith(".txt"):
          all_ids.append((f, 0))
          continue
        # Only non-blank lines are documents; parsed when read.
        all_ids += [(f, lineno) for lineno, line in enumerate(text.split("\n"), 1) if line.strip()]
      names = [self._rel[f] + (f":{lineno}" if lineno else "") for f, lineno in all_ids]
      held = splits.held_out(names, self._eval_fraction)
      self._ids = {
          "train": [i for i, n in zip(all_ids, names) if n not in held],
          "validation": [i for i, n in zip(all_ids, names) if n in held],
      }
    return self._ids[split]

  def num_documents(self, split: str) -> int:
    self.check_split(split)
    return len(self._split_ids(split))

  def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    self.check_split(split)
    wanted = self._split_ids(split)[start:stop]
    for f, group in itertools.groupby(wanted, key=lambda item: item[0]):
      if f.endswith(".txt"):
        yield _read_utf8(f)
        continue
      linenos = [lineno for _, lineno in group]
      lines = _read_utf8(f).split("\n")
      for lineno in linenos:
        try:
          record = json.loads(lines[lineno - 1])
        except json.JSONDecodeError as e:
          raise UserError(f"{f}:{lineno} is not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict) or self._text_key not in record:
          keys = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise UserError(f"{f}:{lineno} has no field {self._text_key!r} (has {keys}); set data.text_key.")
        yield str(record[self._text_key])


def _tfds_builder(name: str, data_dir: str):
  """The TFDS builder for `name`, with a clear error (and the prepare command) when it is not prepared."""
  if not name:
    raise UserError("data.source=tfds needs data.tfds_name, e.g. --config.data.tfds_name=lm1b.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"data.tfds_name={name!r} is not a TFDS dataset; see `tfds.list_builders()`.") from None
  if not builder.is_prepared():
    raise UserError(
        f"TFDS dataset {name} is not prepared in {data_dir}; prepare it with: " f"{prepare_command(name, data_dir)}"
    )
  return builder


def get_source(config: ml_collections.ConfigDict) -> Source:
  """The Source named by config.data.source."""
  data = config.data
  data_dir = data_dir_of(config)
  if data.source == "python_docs":
    if python_docs.find_sources(data_dir) is None and not python_docs.builder(data_dir).is_prepared():
      raise UserError(
          f"the default corpus ({python_docs.PACKAGE}) is missing; run "
          f"`bash scripts/get_python_docs.sh {data.data_dir}` (installs or downloads it)."
      )
    return TFDSSource(python_docs.prepare(data_dir), "text")
  if data.source == "tfds":
    return TFDSSource(_tfds_builder(str(data.tfds_name), data_dir), str(data.text_key))
  if data.source == "text":
    return TextSource(str(data.text_glob), str(data.text_key), float(data.eval_fraction))
  raise UserError(f"data.source={data.source!r} is not one of 'python_docs', 'tfds', 'text'.")


def data_dir_of(config: ml_collections.ConfigDict) -> str:
  """data.data_dir with `~` expanded (buckets as written)."""
  data_dir = str(config.data.data_dir)
  return data_dir if paths.is_remote(data_dir) else os.path.expanduser(data_dir)
