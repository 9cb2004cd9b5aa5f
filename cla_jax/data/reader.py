"""The reader of prepared splits: fixed-length windows in ArrayRecord shards, plus an index, read at random.

A prepared split is a directory (local or a bucket such as gs://...):

  index.json                              what was prepared (corpus fingerprint, tokenizer checksum, seq_len,
                                          token / window / record counts) and the shard list
  windows-00000-of-00003.array_record     one record per window: seq_len + 1 token ids (uint16, or uint32 for
  ...                                     vocabularies above 65536), raw little-endian bytes

Record r < num_windows holds tokens [r * seq_len, r * seq_len + seq_len + 1) of the split's EOS-joined token
stream, so consecutive windows overlap by one token and every token is a target exactly once. When targets
are left after the last full window, one shorter last record holds the tail (evaluation scores it; training
never reads it). This module defines the format and reads it (`PreparedSplit`); `cla_jax.data.prepare` writes
it. It imports no writer, process pool or TFDS, so the batch code that reads it stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from cla_jax.errors import UserError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def shard_name(shard: int, num_shards: int) -> str:
  """The file name of window shard `shard` of `num_shards`."""
  return f"windows-{shard:05d}-of-{num_shards:05d}.array_record"


def read_index(directory: str | os.PathLike) -> dict | None:
  """The index of the prepared split in `directory`, or None when it is not (completely) prepared."""
  path = epath.Path(directory) / INDEX_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class _ShardInstruction:
  """Grain's FileInstruction protocol: with the record count from the index, no shard is opened to count it."""

  filename: str
  skip: int
  take: int
  examples_in_shard: int


class PreparedSplit:
  """Random access to the windows of a prepared split; shards are opened only when a record in them is read."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = epath.Path(directory)
    index = read_index(self.directory)
    if index is None:
      raise UserError(
          f"{self.directory} holds no prepared split ({INDEX_FILE} missing); prepare it with "
          "`python -m cla_jax.cli.prepare --config=... --output=DIR`."
      )
    if index.get("format_version") != FORMAT_VERSION:
      raise UserError(
          f"{self.directory} was prepared in format {index.get('format_version')}, this code reads "
          f"format {FORMAT_VERSION}; prepare it again."
      )
    self.index = index
    self.seq_len = int(index["seq_len"])
    self.dtype = np.dtype(index["dtype"])
    self.num_tokens = int(index["num_tokens"])
    self.num_windows = int(index["num_windows"])
    self.num_records = int(index["num_records"])
    self.tokenizer_checksum = str(index["tokenizer_checksum"])
    shards = [
        _ShardInstruction(str(self.directory / s["file"]), 0, int(s["num_records"]), int(s["num_records"]))
        for s in index["shards"]
    ]
    # Imported here, not at the top: grain imports jax (2 CPU-s), which the prepare step's worker processes,
    # which only write shards, would otherwise pay each.
    import grain.python as grain  # pylint: disable=g-import-not-at-top
    # Grain's ArrayRecord data source: global record keys over the shards, readers created lazily per shard.
    self._source = grain.ArrayRecordDataSource(shards) if shards else None

  def opened_shards(self) -> list[str]:
    """Shard files this reader has opened so far (each host opens only the shards holding its rows)."""
    if self._source is None:
      return []
    return [
        path
        for path, reader in zip(self._source.paths, self._source._readers)  # pylint: disable=protected-access
        if reader is not None
    ]

  def records(self, indices: Sequence[int]) -> list[np.ndarray]:
    """Records `indices` as token arrays (windows of seq_len + 1; the tail record may be shorter)."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    raw = self._source.__getitems__(indices)
    return [np.frombuffer(r, dtype=self.dtype) for r in raw]

  def windows(self, indices: np.ndarray) -> np.ndarray:
    """The full windows `indices` (each < num_windows) as one [n, seq_len + 1] array."""
    out = np.empty((len(indices), self.seq_len + 1), self.dtype)
    for row, record in enumerate(self.records(indices)):
      out[row] = record
    return out

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split's stream (0 <= start < stop <= num_tokens), from the records holding them."""
    if not 0 <= start < stop <= self.num_tokens:
      raise ValueError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}).")
    first, last = start // self.seq_len, min((stop - 1) // self.seq_len, self.num_records - 1)
    records = self.records(range(first, last + 1))
    # Record r starts at token r * seq_len; all but the last contribute their first seq_len tokens.
    stream = np.concatenate([r[: self.seq_len] for r in records[:-1]] + [records[-1]])
    return stream[start - first * self.seq_len : stop - first * self.seq_len]
