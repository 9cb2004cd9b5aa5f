"""`cla-aot`: the trainer's step compiled for a TPU slice on a CPU host (libtpu compile-only devices)."""

import json
import os
import subprocess
import sys

import pytest

from cla_jax import aot, config_lib, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_paper_1b_row_at_the_paper_batch_per_chip_stays_within_its_bound():
  config = config_lib.load("configs/paper_1b.py:H128-MQA-CLA2")
  # One CLA2 group (2 layers) at the row's width, vocabulary and sequence; the paper's 8 sequences per chip,
  # fsdp over a v5e-16 (its compile is about half a v5e:2x2's: smaller weight shards per chip).
  config.model.num_layers = 2
  config.train.batch_size = config.eval.batch_size = 16 * 8
  config.mesh.data, config.mesh.fsdp = 1, -1
  report = aot.check(config, "v5e-16", eval_step=False)
  assert report["fits"], report
  # Per chip 8 x 2048 = 16,384 tokens. Saved for the backward (bf16): the two layers' inputs, two queries
  # (2048 wide each), two gates and two ups (5472), one K and V (128 each): 2 x 16,384 x (4 x 2048 + 4 x 5472 +
  # 256) = 0.99 GB. The loss's one chunk of fp32 logits and its gradient (2 x 8 x 256 x 50,304 x 4 = 0.82 GB),
  # the embedding's fp32 gradient before its reduce-scatter and a copy (2 x 50,304 x 2048 x 4 = 0.82 GB), the
  # fused splash backward's dq per key block (4 x 16,384 x 2048 x 2 = 0.27 GB): 2.9 GB. 4.5 GB leaves XLA room
  # (measured 4.04) but not whole fp32 logits (8 x 2048 x 50,304 x 4 = 3.3 GB) or stored attention
  # probabilities (16 heads x 2048^2 x 4 bytes x 8 sequences = 2.1 GB a layer).
  assert report["temp_bytes"] < 4.5e9, report["temp_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("topology_name, per_chip", [("v5e-16", 8), ("v5p-64", 48)])
def test_cla2_needs_at_most_one_layer_of_activations_more_than_mqa_in_training(topology_name, per_chip):
  """Four 1B-width layers: CLA2 (2 groups of 2) vs MQA (4 of 1), at the paper's 8 sequences a chip on a v5e-16
  and at 48 on a v5p-64 (32 chips, fsdp 32: where XLA splits each matmul into a windowed loop)."""
  totals = {}
  for row in ("H128-MQA-CLA2", "H128-MQA"):
    config = config_lib.load(f"configs/paper_1b.py:{row}")
    config.model.num_layers = 4
    chips = topology.parse(topology_name).chips
    config.train.batch_size = config.eval.batch_size = chips * per_chip
    config.mesh.data, config.mesh.fsdp = 1, -1
    totals[row] = aot.check(config, topology_name, eval_step=False)["total_bytes"]
  # CLA2 saves fewer residuals (one K/V pair per group), but a 2-layer scanned body may hold one layer's saved
  # activations (query 2048 + gate and up 2 x 5472 wide: 2048 tokens x 12,992 x 2 bytes = 53 MB a sequence)
  # and its input (8 MB) until the body ends, and one FFN-sized working buffer (22 MB): 84 MB a sequence,
  # 0.67 GB at 8 a chip, 4.0 GB at 48. Measured 0.52 and 1.47 GB. With the group checkpointed whole, XLA held
  # both layers' recomputed activations at once (1.98 GB at 8); with weight gradients left to XLA's schedule,
  # each held its layer's activations through the next layer's backward (6.30 GB at 48).
  bound = per_chip * 2048 * (2048 + 2 * 5472 + 2048 + 5472) * 2
  assert totals["H128-MQA-CLA2"] - totals["H128-MQA"] < bound, (totals, bound)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "cla_jax.cli.aot", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v5e-3"], "unknown TPU topology 'v5e-3'"),
        (["--topology=v5e-16", "--num_slices=0"], "num_slices"),
        (["--topology=v5e:2x2", "--config.mesh.tensor=3"], "mesh"),
        (["--topology=v5e:2x2", "--config.train.batch_size=6"], "cannot be split over mesh"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
  result = _cli("--config=configs/default.py", *args)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
  assert result.stdout == ""


@pytest.mark.slow
def test_default_config_fits_a_v5e_2x2_with_tpu_choices_and_ends_with_the_json_line():
  # One compile of the train step and one of the eval step (the command as users run it), two layers: the
  # scan makes depth nearly free to compile, and the policy checks below do not depend on it.
  result = _cli("--config=configs/default.py", "--topology=v5e:2x2", "--config.model.num_layers=2")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for field in ("topology", "chips", "batch_per_chip", "remat", "attention", "hbm_per_chip_bytes", "temp_bytes"):
    assert field in report
  assert "total" in result.stdout
  assert report["chips"] == 4 and report["batch_per_chip"] == 4
  assert (report["attention"], report["remat"], report["dtype"]) == ("splash", "save_qkv_ffn", "bfloat16")
  assert report["fits"] is True and 0 < report["total_bytes"] < 0.9 * 16 * 2**30
  assert report["eval_total_bytes"] > 0
  # FLOPs counted with the scan's trip count: at least the model's 6*N*tokens + attention, and the policy's
  # recomputation (attention forward, no matmul) keeps it well under a whole second forward (ratio 4/3).
  assert 1.0 <= report["recompute_ratio"] < 1.33, report["recompute_ratio"]
  assert report["collectives"]["all-reduce"]["count"] >= 1  # data parallelism: gradients are all-reduced


def test_remat_search_walks_from_least_recomputation_and_stops_at_the_first_fit(monkeypatch):
  fitting = {"save_qkv_ffn", "full"}  # a stand-in for the compiler: what fits at this batch
  compiled = []

  def fake_check(config, topology_name, num_slices=1, eval_step=True):
    compiled.append(config.model.remat)
    return {"fits": config.model.remat in fitting, "total_bytes": 1, "recompute_ratio": 1.1}

  monkeypatch.setattr(aot, "check", fake_check)
  config = config_lib.load("configs/default.py")
  found = aot.cheapest_remat(config, "v5e:2x2")
  assert found["remat"] == "save_qkv_ffn" and compiled == ["none", "save_dots", "save_qkv_ffn"]
  assert aot.advice({"remat": "save_qkv_ffn"}, found) == "remat=save_qkv_ffn is the cheapest policy that fits"
  assert "set --config.model.remat=save_qkv_ffn" in aot.advice({"remat": "none"}, found)
  fitting.clear()
  assert "grad_accum_steps" in aot.advice({"remat": "none"}, aot.cheapest_remat(config, "v5e:2x2", start="full"))


def test_a_pattern_of_several_segments_is_tried_unrolled_before_a_costlier_policy(monkeypatch):
  # DenseFront's case: save_qkv_ffn scanned does not fit, the same policy unrolled does (and full would).
  compiled = []

  def fake_check(config, topology_name, num_slices=1, eval_step=True):
    compiled.append((config.model.remat, config.model.scan_layers))
    fits = config.model.remat == "full" or (config.model.remat == "save_qkv_ffn" and not config.model.scan_layers)
    return {"fits": fits, "total_bytes": 1, "recompute_ratio": 1.13}

  monkeypatch.setattr(aot, "check", fake_check)
  config = config_lib.load("configs/default.py")
  config.model.pattern = "keep_ends"  # groups 1, 2, 1: three segments
  found = aot.cheapest_remat(config, "v5e:2x2", start="save_qkv_ffn", skip_first=True)
  assert compiled == [("save_qkv_ffn", False)] and (found["remat"], found["scan_layers"]) == ("save_qkv_ffn", False)
  line = aot.advice({"remat": "save_qkv_ffn", "scan_layers": True}, found)
  assert line.startswith("set --config.model.scan_layers=False (") and "remat=" not in line
  # The same rule picks the second --max_batch search: the config unrolled, the original left as it was.
  assert aot.unrolled(config).model.scan_layers is False and config.model.scan_layers is True
  # One segment: unrolling changes nothing XLA schedules, so it is never tried.
  compiled.clear()
  config.model.pattern = "cla2"
  assert aot.unrolled(config) is None
  assert aot.cheapest_remat(config, "v5e:2x2", start="save_qkv_ffn", skip_first=True)["remat"] == "full"
  assert compiled == [("full", True)]


@pytest.mark.parametrize(
    "bytes_at, expected",
    [
        # Fixed 2 GB, 0.27 GB a sequence, with some scheduling wobble: 49 fit (49 is a multiple of 7), 50 do not.
        (lambda b: 2e9 + 0.27e9 * b + (2e8 if b % 7 == 0 else 0), None),
        # Memory that grows faster than the line through small batches predicts (and a knee).
        (lambda b: 1e9 + 1e8 * b * b, None),
        # A compiler that names no bytes for a failed compile: the line runs through the batches that fit.
        (lambda b: 3e9 * b, 5),
    ],
)
def test_max_batch_finds_the_edge_exactly_in_fewer_compiles_than_bisection(monkeypatch, bytes_at, expected):
  limit = aot.FIT_FRACTION * 16 * 2**30  # a v5e chip, 90%
  compiled = []

  def fake_check(config, topology_name, num_slices=1, eval_step=True):
    per_chip = config.train.batch_size // 4  # v5e:2x2, no accumulation
    compiled.append(per_chip)
    total = bytes_at(per_chip)
    fits = total <= limit
    return {"fits": fits, "total_bytes": total if fits or expected is None else None}

  monkeypatch.setattr(aot, "check", fake_check)
  found = aot.max_batch(config_lib.load("configs/default.py"), "v5e:2x2")
  truth = max(b for b in range(1, 5000) if bytes_at(b) <= limit)
  assert found["max_batch_per_chip"] == truth and found["compiles"] == compiled
  assert compiled[0] == 16 // 4  # the first question: does the configured batch (16 on 4 chips) fit?
  assert expected is None or truth == expected
  # Doubling then bisection needs about 2 log2(truth) compiles (12 for 48); the line needs a handful.
  assert len(compiled) <= (8 if expected is None else 2 * truth.bit_length() + 1), compiled


def test_a_step_xla_refuses_for_memory_is_reported_in_the_table_with_what_it_needs():
  # The shape of check()'s result when XLA's compile runs out of HBM and names the bytes it needed (3B rows on
  # a v5p-128 at the paper's batch): a table, never a KeyError over FLOPs that were not computed.
  result = {
      "topology": "v5p-128",
      "num_slices": 1,
      "chips": 64,
      "device_kind": "TPU v5",
      "mesh": {"data": 1, "fsdp": 64, "tensor": 1},
      "global_batch": 2048,
      "seq_len": 2048,
      "batch_per_chip": 32.0,
      "grad_accum_steps": 1,
      "remat": "save_qkv_ffn",
      "attention": "splash",
      "dtype": "bfloat16",
      "hbm_per_chip_bytes": 102.0e9,
      "fits": False,
      "argument_bytes": 1.5e9,
      "temp_bytes": 140.0e9,
      "total_bytes": 141.5e9,
      "usable_hbm_bytes": 101.0e9,
      "largest_temporaries": [{"bytes": 20e9, "shape": "bf16[16,32,2048,8192]", "source": "gate"}],
  }
  text = aot.table(result)
  assert "140.00 GB (XLA: does not fit; usable HBM 101.00 GB)" in text
  assert "141.50 GB" in text and "bf16[16,32,2048,8192] gate" in text
  assert text.splitlines()[-1].split() == ["fits", "NO", "(limit", "90%", "of", "HBM)"]
