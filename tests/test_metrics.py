"""MFU: the FLOPs-per-token formula against a hand count of a paper row, and a CPU peak the run cannot beat."""

import json

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


def test_cpu_peak_is_the_best_ever_measured_on_this_machine(peak_cache):
  measured = metrics.measured_cpu_peak(size=128, min_trials=3, min_seconds=0.0)
  assert measured > 0
  (key,) = json.loads(peak_cache.read_text())
  # A faster earlier measurement (the cores were free then) stays the peak...
  peak_cache.write_text(json.dumps({key: 1e6 * measured}))
  metrics.measured_cpu_peak.cache_clear()
  assert metrics.measured_cpu_peak(size=128, min_trials=3, min_seconds=0.0) == 1e6 * measured
  # ...and a slower one (a busy host) is replaced by the new measurement.
  peak_cache.write_text(json.dumps({key: 1.0}))
  metrics.measured_cpu_peak.cache_clear()
  assert metrics.measured_cpu_peak(size=128, min_trials=3, min_seconds=0.0) > 1.0
  assert json.loads(peak_cache.read_text())[key] > 1.0


def test_unwritable_peak_cache_still_measures(peak_cache):
  peak_cache.mkdir()  # a directory where the file should be: reading and writing both fail
  assert metrics.measured_cpu_peak(size=128, min_trials=3, min_seconds=0.0) > 0


def test_log_never_shows_mfu_above_100_percent(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=2, enabled=True)
  base = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "step_time": 0.1}
  writer.write(1, {**base, "mfu": 1.37})
  writer.write(2, {**base, "mfu": 0.25})
  writer.close()
  assert [r["mfu"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1.0, 0.25]
  lines = capsys.readouterr().out.splitlines()
  assert "mfu 100.0%" in lines[0] and "mfu 25.0%" in lines[1]
