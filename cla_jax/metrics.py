"""Model FLOPs, peak FLOP/s per device kind, MFU, and the metric writers (TensorBoard, JSONL, console).

FLOPs per trained token (forward + backward = 3x forward, 2 FLOPs per multiply-add):
  6 * N_matmul + 6 * L * n * h * T
where N_matmul counts every weight used in a matmul, read from the actual param shapes (so CLA's
fewer K/V projections are counted exactly, and the embedding lookup is excluded unless the
embedding doubles as the output head), and the second term is causal self-attention: per layer
QK^T and AV each cost 2 * n * h FLOPs per (query, key) pair, and a causal query sees T/2 keys on
average. L = layers, n = query heads, h = head dim, T = sequence length. (PaLM's convention counts
the full T x T square, i.e. twice our attention term.)
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib

# Dense bf16 peak FLOP/s per device (chip), from vendor spec sheets; matched by substring of
# `device.device_kind`, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe parts are ~756e12
    ("A100", 312e12),
)
NOT_MATMUL = ("scale", "bias", "embed")


def matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Number of weights that take part in a matmul per token (embedding lookup excluded)."""
  params = model_lib.abstract_params(cfg)
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: hasattr(x, "value")):
    name = getattr(path[-1], "key", str(path[-1]))
    if name not in NOT_MATMUL:
      total += math.prod(getattr(leaf, "value", leaf).shape)
  if cfg.tie_embeddings:
    total += cfg.vocab_size * cfg.d_model  # the embedding is also the output head
  return total


def flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token; see the module docstring for the formula."""
  attention = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params(cfg) + attention


def device_peak_flops(device: jax.Device) -> float | None:
  """Table peak bf16 FLOP/s of one accelerator, or None when unknown (CPU, new chips)."""
  kind = getattr(device, "device_kind", "")
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


# Per-machine record of the best plausible CPU matmul FLOP/s measured (see measured_cpu_peak).
CPU_PEAK_CACHE = os.path.join("~", ".cache", "cla_jax", "cpu_peak.json")
# No CPU core sustains a higher clock; used when the kernel does not report the maximum frequency.
MAX_CPU_HZ = 6.0e9


def _cpu_info() -> tuple[str, set[str]]:
  """(CPU model name, feature flags) from /proc/cpuinfo; the platform's names where it cannot be read."""
  model, features = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          model = value.strip()
        elif key.strip() in ("flags", "Features") and not features:
          features = set(value.split())
  except OSError:
    pass
  return model, features


def _usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _max_clock_hz() -> float:
  """The highest clock the kernel reports for any core (cpufreq), else MAX_CPU_HZ."""
  try:
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
      return float(f.read().strip()) * 1e3  # kHz
  except (OSError, ValueError):
    return MAX_CPU_HZ


def fp32_lanes(features: set[str]) -> int:
  """fp32 values per vector instruction from the CPU flags (AVX-512: 16, AVX/AVX2: 8); 16 when unknown."""
  if "amx_tile" in features:
    return 256  # AMX tiles: far beyond vectors; keep the bound generous rather than wrong
  if "avx512f" in features:
    return 16
  if "avx" in features or "avx2" in features:
    return 8
  if "sse" in features or "asimd" in features or "neon" in features:
    return 4
  return 16


def cpu_peak_bound() -> float:
  """An upper bound on this host's fp32 FLOP/s: cores x max clock x SIMD lanes x 2 (FMA) x 2 FMA units.

  No measurement can honestly exceed it; one that does timed a busy or throttled clock, not the CPU.
  """
  _, features = _cpu_info()
  return _usable_cores() * _max_clock_hz() * fp32_lanes(features) * 2 * 2


def _machine_key() -> str:
  """Host name, CPU model and usable cores: what the CPU peak depends on."""
  return f"{platform.node()} | {_cpu_info()[0]} | {_usable_cores()} cores"


def _read_peak_cache(path: str) -> dict[str, float]:
  try:
    with open(path, encoding="utf-8") as f:
      return {k: float(v) for k, v in json.load(f).items()}
  except (OSError, ValueError, AttributeError, TypeError):
    return {}


def _write_peak_cache(path: str, cache: dict[str, float]) -> None:
  try:  # a read-only or shared home only loses the cache, never the run
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    pass


def time_matmul(size: int = 1024, trials: int = 9) -> float:
  """Median FLOP/s of `trials` timed runs of a jitted fp32 [size x size] matmul on the CPU (after a warm-up).

  The median, not the best: one run that the timer or a neighbour's load made look fast is ignored.
  """
  x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices("cpu")[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  return 2.0 * size**3 / max(median_seconds(lambda: matmul(x).block_until_ready(), trials), 1e-9)


def median_seconds(fn: Any, trials: int, clock: Any = time.perf_counter) -> float:
  """Median wall time of `trials` calls of `fn`."""
  times = []
  for _ in range(trials):
    start = clock()
    fn()
    times.append(clock() - start)
  return float(np.median(times))


@functools.cache
def measured_cpu_peak(size: int = 1024, trials: int = 9) -> float:
  """The CPU 'peak' for MFU: the best plausible median fp32 matmul FLOP/s measured on this machine; nan if none.

  A quick timing on a busy host comes out low (an MFU above 100% would follow), so the best measurement
  is kept in CPU_PEAK_CACHE. Only values at or below `cpu_peak_bound()` are believed: a larger one, new or
  cached, is a timing fault, and caching it would make every later run's MFU absurdly small.
  """
  bound = cpu_peak_bound()
  measured = time_matmul(size, trials)
  path, key = os.path.expanduser(CPU_PEAK_CACHE), f"{_machine_key()} | fp32 matmul {size}"
  cache = _read_peak_cache(path)
  plausible = [v for v in (measured, cache.get(key, 0.0)) if 0 < v <= bound]
  peak = max(plausible, default=math.nan)
  if cache.get(key) != (peak if plausible else None):  # a new best, or an implausible entry to drop
    kept = {k: v for k, v in cache.items() if k != key}
    _write_peak_cache(path, {**kept, key: peak} if plausible else kept)
  return peak


def total_peak_flops(devices: list[jax.Device], override_per_device: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where it came from); nan when unknown (MFU is then n/a)."""
  if override_per_device > 0:
    return override_per_device * len(devices), "config"
  if devices[0].platform == "cpu":
    # Fake CPU devices (--xla_force_host_platform_device_count) share the same cores: the host is one peak.
    peak = measured_cpu_peak()
    if math.isnan(peak):
      return math.nan, f"CPU matmul timing above this CPU's bound of {cpu_peak_bound() / 1e12:.2f} TFLOP/s"
    return peak * jax.process_count(), "best fp32 matmul measured on this machine"
  per_device = device_peak_flops(devices[0])
  if per_device is None:
    return math.nan, f"unknown device kind {devices[0].device_kind!r}"
  return per_device * len(devices), f"{devices[0].device_kind} bf16 table"


def format_peak(peak_flops: float) -> str:
  """'12.34 TFLOP/s', or 'n/a' for an unknown peak."""
  return f"{peak_flops / 1e12:.2f} TFLOP/s" if math.isfinite(peak_flops) and peak_flops > 0 else "n/a"


def perplexity(mean_nll: float) -> float:
  """exp of a mean negative log-likelihood, saturating to inf instead of raising (untrained or diverged models)."""
  return math.exp(mean_nll) if mean_nll < 709 else math.inf


class MetricWriter:
  """Writes metrics of process 0: TensorBoard events, DIR/metrics.jsonl (appended) and a console line."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._start_time = time.time()
    self._start_step: int | None = None
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR), flush_secs=30)
      path = os.path.join(workdir, workdir_lib.METRICS_FILE)
      self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if self._jsonl.tell() and not _ends_with_newline(path):
        self._jsonl.write("\n")  # a crash mid-write left a partial line: start this run's records on a new one

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs one step: every numeric value to TensorBoard, one JSON line, one console line."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if isinstance(record.get("mfu"), float) and not 0 <= record["mfu"] <= 1.0:
      # Beating the peak means the peak is wrong (e.g. timed on a busy CPU): unknown, not a clamped 100%.
      record["mfu"] = math.nan
    self._jsonl.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        group = "eval" if key.startswith("eval_") else "train"
        self._tb.add_scalar(f"{group}/{key}", value, step)
    print(self._console_line(record), flush=True)

  def _console_line(self, r: dict[str, Any]) -> str:
    if self._start_step is None:
      self._start_step, self._start_time = r["step"], time.time()
    parts = [f"step {r['step']}/{self.total_steps}", f"loss {r['loss']:.4f}"]
    if "eval_loss" in r:
      parts.append(f"val {r['eval_loss']:.4f}")
    parts += [
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s'] / 1e3:.1f}k tok/s",
        f"mfu {100 * r['mfu']:.1f}%" if math.isfinite(r["mfu"]) else "mfu n/a",
        f"{r['step_time']:.3f} s/step",
    ]
    done = r["step"] - self._start_step
    if done > 0 and r["step"] < self.total_steps:
      eta = (time.time() - self._start_time) / done * (self.total_steps - r["step"])
      parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    return " | ".join(parts)

  def message(self, text: str) -> None:
    """A console message from process 0 (startup, checkpoints, preemption)."""
    if self.enabled:
      print(text, flush=True)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; on a full disk TensorBoard's unwritten events are dropped, not raised."""
    if self._tb is None:
      return
    tb, jsonl, self._tb, self._jsonl = self._tb, self._jsonl, None, None
    jsonl.close()  # flushed after every record: nothing left to write
    try:
      tb.close()
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
      # The run is already failing with a one-line disk-full error and metrics.jsonl holds every step. Left
      # open, tensorboardX's exit hook would retry the flush and print a traceback after that line. (Private
      # attributes of the pinned tensorboardX; another version without them gets that traceback, not a crash.)
      for writer in (getattr(tb, "all_writers", None) or {}).values():
        events = getattr(writer, "event_writer", None)
        if events is not None and getattr(events, "_closed", True) is False and hasattr(events, "_worker"):
          events._worker.stop()  # pylint: disable=protected-access
          events._closed = True  # pylint: disable=protected-access


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _plain(value: Any) -> Any:
  """numpy / jax scalars -> Python numbers."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    value = np.asarray(value).item()
  return value


def _json_safe(value: Any) -> Any:
  """Strict JSON has no NaN/inf: write them as the strings "nan", "inf"."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def read_jsonl_counted(path: str) -> tuple[list[dict[str, Any]], int]:
  """(records of a metrics.jsonl, number of unreadable lines skipped); the later record of a step wins.

  A crash mid-write leaves a partial last line; it costs that one record, never the file.
  """
  by_step: dict[int, dict[str, Any]] = {}
  skipped = 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        by_step[int(record["step"])] = record
      except (ValueError, KeyError, TypeError):
        skipped += 1
  return [by_step[s] for s in sorted(by_step)], skipped


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl (see read_jsonl_counted); warns on stderr when lines were unreadable."""
  records, skipped = read_jsonl_counted(path)
  if skipped:
    print(f"warning: skipped {skipped} unreadable line(s) of {path}", file=sys.stderr, flush=True)
  return records
