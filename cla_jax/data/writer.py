"""The writer of prepared splits (format: `cla_jax.data.reader`): atomic files, window shards, shard sizes.

Every file appears whole or not at all, so a killed prepare step leaves nothing half-written behind and a
resumed one can skip every file that exists; the tokenizer cache and workdir copies are written the same way.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from array_record.python import array_record_module
from etils import epath

# Random access reads one record at a time: ArrayRecord's group size 1 (what Grain expects).
WRITER_OPTIONS = "group_size:1"
# Shard sizes: at most MAX_SHARD_BYTES per file, and as many files of at least MIN_SHARD_BYTES as the split
# holds, up to MIN_SHARDS, so that several workers write (and later hosts read) it in parallel.
MAX_SHARD_BYTES = 128 << 20
MIN_SHARD_BYTES = 4 << 20
MIN_SHARDS = 16

_UMASK = os.umask(0)
os.umask(_UMASK)


def records_per_shard(num_records: int, seq_len: int, dtype: np.dtype) -> int:
  """Records per shard for a split of `num_records` windows (see MAX_SHARD_BYTES and MIN_SHARDS)."""
  record_bytes = (seq_len + 1) * np.dtype(dtype).itemsize
  split_bytes = num_records * record_bytes
  num_shards = max(1, math.ceil(split_bytes / MAX_SHARD_BYTES), min(MIN_SHARDS, split_bytes // MIN_SHARD_BYTES))
  return max(1, math.ceil(num_records / num_shards))


def atomic_write(path: epath.Path, write: Callable[[str], None]) -> None:
  """Calls write(local_tmp_path), then moves the file to `path` in one step, so readers never see part of it.

  Local paths: a temporary file in the same directory and a rename. Buckets: a local temporary file, then
  one upload (an object appears whole or not at all).
  """
  path = epath.Path(path)
  local = not path.as_posix().count("://")
  directory = str(path.parent) if local else None
  if local:
    path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name + ".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; prepared data is meant to be shared
    if local:
      os.replace(tmp, path)
    else:
      epath.Path(tmp).copy(path, overwrite=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_shard(path: epath.Path, records: Sequence[np.ndarray]) -> None:
  """Writes `records` (1-D token arrays) as one ArrayRecord file, atomically."""

  def write(tmp: str) -> None:
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    for record in records:
      writer.write(np.ascontiguousarray(record).tobytes())
    writer.close()

  atomic_write(path, write)


def write_bytes(path: epath.Path, data: bytes) -> None:
  """Writes `data` to `path`, atomically."""
  atomic_write(path, lambda tmp: epath.Path(tmp).write_bytes(data))


def write_json(path: epath.Path, data: dict) -> None:
  """Writes `data` as JSON, atomically."""

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")

  atomic_write(path, write)
