"""Batches: this host's rows of step-indexed training batches and of the in-order validation batches.

Training windows are the records of a prepared split (a `cla_jax.data.reader.PreparedSplit`, which
`cla_jax.data.prepare.open_split` opens). Each epoch visits
them in a permutation seeded by (data.seed, epoch); global row r of the run is window perm_{r // W}[r % W].
So `batch(step)` is a pure function of (data, seed, step): resuming is restarting at the checkpointed step,
and host p of P takes rows [p * B/P, (p+1) * B/P) of the global batch, which is therefore the same for any
number of hosts. A host reads only the records of its rows (random access through Grain's ArrayRecord data
source), so its memory and disk do not grow with the corpus.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import ml_collections
import numpy as np

from cla_jax.data.reader import PreparedSplit
from cla_jax.errors import UserError

Batch = dict[str, np.ndarray]


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
    raise UserError(
        f"{what}={batch_size} must be divisible by the number of hosts ({process_count}); "
        f"use a multiple of {process_count}."
    )
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

  def __init__(
      self,
      data: PreparedSplit,
      batch_size: int,
      data_config: ml_collections.ConfigDict,
      eos_id: int,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    """Global batches of `batch_size` windows of `data`, in epochs seeded by `data_config` (the `data` section).

    With data_config.packing, `eos_id` starts a segment; `iterator` reads data_config.prefetch batches ahead.
    """
    self.process_index, self.process_count = _host(process_index, process_count)
    self.global_batch = int(batch_size)
    self.local_batch = _local_rows(self.global_batch, self.process_index, self.process_count, "train.batch_size")
    self.seq_len = data.seq_len
    self.seed = int(data_config.seed)
    self.packing = bool(data_config.packing)
    self.prefetch = max(0, int(data_config.prefetch))
    self.eos_id = int(eos_id)
    self.data = data
    self.split = self.data.index["split"]
    self.num_windows = self.data.num_windows
    if self.num_windows == 0:
      raise UserError(
          f"the {self.split} split has {self.data.num_tokens} tokens, fewer than train.seq_len + 1 = "
          f"{self.seq_len + 1}; use more data or a shorter seq_len."
      )
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
    windows = self.data.windows(self.window_indices(step))
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


def eval_batches(
    data: PreparedSplit,
    batch_size: int,
    seq_len: int,
    max_tokens: int,
    *,
    eos_id: int,
    packing: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
  """This host's rows of the evaluation batches of `data`: consecutive windows in order, the first max_tokens targets.

  The stream's targets (every token after the first) are scored once each, seq_len per row; the last row
  and the last batch are padded with weights 0. max_tokens <= 0 scores the whole split. The rows need not
  have the prepared split's seq_len (evaluation may change it): they are cut from its token stream.
  """
  process_index, process_count = _host(process_index, process_count)
  local = _local_rows(int(batch_size), process_index, process_count, "eval batch_size")
  seq_len = int(seq_len)
  total = num_targets(data, max_tokens)
  if total == 0:
    raise UserError(
        f"the {data.index['split']} split is empty; add data or raise data.eval_fraction (for data.source=text)."
    )
  num_rows = math.ceil(total / seq_len)
  num_batches = math.ceil(num_rows / batch_size)
  offsets = np.arange(seq_len + 1)
  for b in range(num_batches):
    rows = b * batch_size + process_index * local + np.arange(local)
    positions = rows[:, None] * seq_len + offsets  # window token positions in the stream
    # A window position is real when it exists and, for targets, lies within the first `total` targets.
    real = positions[:, 1:] <= total
    first, last = int(positions.min()), min(int(positions.max()) + 1, total + 1)
    stream = data.tokens(first, last) if first < last else np.zeros((0,), data.dtype)
    index = np.clip(positions - first, 0, max(len(stream) - 1, 0))
    windows = stream[index].astype(np.int64) if len(stream) else np.zeros(positions.shape, np.int64)
    windows[:, 1:] = np.where(real, windows[:, 1:], 0)
    windows[:, 0] = np.where(real[:, 0], windows[:, 0], 0)
    yield _batch_from_windows(windows, real.astype(np.float32), bool(packing), int(eos_id))


def num_targets(data: PreparedSplit, max_tokens: int) -> int:
  """Targets eval_batches scores in `data` (a PreparedSplit): all of them, or the first max_tokens (> 0)."""
  total = max(data.num_tokens - 1, 0)
  return min(total, int(max_tokens)) if max_tokens and max_tokens > 0 else total
