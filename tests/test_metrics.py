"""MFU: the FLOPs-per-token formula against a hand count of a paper row, and a CPU peak the run cannot beat."""

import json
import math

import pytest

from cla_jax import config_lib, metrics


def test_flops_per_token_matches_a_hand_count_of_a_paper_row():
  """H128-MQA-CLA2 (1B, Table 1), counted by hand from the paper's dimensions, not from the param tree."""
  config = config_lib.load("configs/paper_1b.py:H128-MQA-CLA2")
  d, f, v, layers, heads, head_dim, kv_blocks, seq = 2048, 5472, 50304, 20, 16, 128, 10, 2048
  assert (config.model.d_model, config.model.mlp_dim, config.model.vocab_size, config.train.seq_len) == (d, f, v, seq)
  per_layer = 2 * d * heads * head_dim + 3 * d * f  # Q and O projections, SwiGLU gate/up/down
  per_kv_block = 2 * d * 1 * head_dim  # MQA: one K and one V head per group of two layers
  matmul_weights = layers * per_layer + kv_blocks * per_kv_block + d * v  # + the untied output head
  # fwd + bwd = 3 x (2 FLOPs per multiply-add); causal attention: QK^T and AV over T/2 keys on average.
  expected = 6 * matmul_weights + 3 * 2 * 2 * layers * heads * head_dim * seq / 2
  assert metrics.flops_per_token(config_lib.model_config(config), seq) == expected
  assert 5.9e9 < expected < 6.2e9  # ~6 x 1B parameters


@pytest.fixture
def peak_cache(tmp_path, monkeypatch):
  path = tmp_path / "cpu_peak.json"
  monkeypatch.setattr(metrics, "CPU_PEAK_CACHE", str(path))
  metrics.measured_cpu_peak.cache_clear()
  yield path
  metrics.measured_cpu_peak.cache_clear()


def test_cpu_peak_bound_counts_cores_clock_and_vector_width(monkeypatch):
  monkeypatch.setattr(metrics, "_usable_cores", lambda: 2)
  monkeypatch.setattr(metrics, "_max_clock_hz", lambda: 3e9)
  for flags, lanes in ((set(), 16), ({"sse", "avx", "avx2", "fma"}, 8), ({"avx2", "avx512f"}, 16), ({"asimd"}, 4)):
    monkeypatch.setattr(metrics, "_cpu_info", lambda flags=flags: ("cpu", flags))
    assert metrics.cpu_peak_bound() == 2 * 3e9 * lanes * 4
  # The bound holds on this machine: a real (median) measurement never exceeds it.
  monkeypatch.undo()
  assert 0 < metrics.time_matmul(size=128, trials=3) <= metrics.cpu_peak_bound()


def test_matmul_timing_is_the_median_of_its_trials():
  # Five timed calls on a fake clock: one absurdly fast (a clock glitch, a neighbour pausing), four of 10 s.
  durations, now = iter([10.0, 10.0, 1e-6, 10.0, 10.0]), [0.0]

  def call():
    now[0] += next(durations)

  assert metrics.median_seconds(call, 5, clock=lambda: now[0]) == 10.0


@pytest.mark.parametrize(
    "cached, measured, peak, stored",
    [
        (None, 5e10, 5e10, 5e10),  # first measurement: kept
        (8e10, 5e10, 8e10, 8e10),  # a faster earlier measurement (free cores then) stays the peak
        (1e9, 5e10, 5e10, 5e10),  # a slower one (a busy host) is replaced
        (3.5e14, 5e10, 5e10, 5e10),  # a cached value above the CPU's bound is ignored and replaced
        (None, 3.5e14, math.nan, None),  # an implausible measurement: no peak (MFU n/a), nothing cached
        (3.5e14, 3.5e14, math.nan, None),  # ... and an implausible cache entry is dropped
    ],
)
def test_cpu_peak_cache_never_holds_more_than_the_bound(peak_cache, monkeypatch, cached, measured, peak, stored):
  monkeypatch.setattr(metrics, "cpu_peak_bound", lambda: 1e12)
  monkeypatch.setattr(metrics, "time_matmul", lambda size, trials: measured)
  key = f"{metrics._machine_key()} | fp32 matmul 1024"  # pylint: disable=protected-access
  other = {"another machine | x | 4 cores | fp32 matmul 1024": 1e11}
  peak_cache.write_text(json.dumps({**other, **({key: cached} if cached else {})}))
  result = metrics.measured_cpu_peak()
  assert result == peak or (math.isnan(peak) and math.isnan(result))
  assert json.loads(peak_cache.read_text()) == {**other, **({key: stored} if stored else {})}


def test_implausible_cpu_peak_makes_mfu_unknown(peak_cache, monkeypatch):
  monkeypatch.setattr(metrics, "cpu_peak_bound", lambda: 1e12)
  monkeypatch.setattr(metrics, "time_matmul", lambda size, trials: 3.5e14)
  peak, source = metrics.total_peak_flops(metrics.jax.devices("cpu"))
  assert math.isnan(peak) and "bound of 1.00 TFLOP/s" in source
  assert metrics.format_peak(peak) == "n/a" and metrics.format_peak(2.5e12) == "2.50 TFLOP/s"


def test_unwritable_peak_cache_still_measures(peak_cache):
  peak_cache.mkdir()  # a directory where the file should be: reading and writing both fail
  assert 0 < metrics.measured_cpu_peak(size=128, trials=3) <= metrics.cpu_peak_bound()


def test_mfu_above_100_percent_is_logged_as_unknown_not_clamped(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=3, enabled=True)
  base = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "step_time": 0.1}
  writer.write(1, {**base, "mfu": 1.37})
  writer.write(2, {**base, "mfu": 0.25})
  writer.write(3, {**base, "mfu": float("nan")})
  writer.close()
  mfus = [r["mfu"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))]
  assert mfus == ["nan", 0.25, "nan"]
  lines = capsys.readouterr().out.splitlines()
  assert "mfu n/a" in lines[0] and "mfu 25.0%" in lines[1] and "mfu n/a" in lines[2]
  assert "100.0%" not in "".join(lines)
