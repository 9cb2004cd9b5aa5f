"""The sweep runner end to end on tiny runs, its reports, and the Pareto frontier against hand-worked cases."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from cla_jax import sweep, sweep_report
from cla_jax.errors import UserError
from tests import train_helpers

# -- Pareto frontier and per-row statistics (hand-computed) ------------------------------------------------


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], []),
        ([(4, 1.0)], [(4, 1.0)]),
        # (3, 3.5) costs more than (2, 3) and is worse; (2, 4) loses to (2, 3) at the same cost; (4, 2) to (4, 1).
        ([(3, 3.5), (1, 5.0), (2, 4.0), (4, 2.0), (2, 3.0), (4, 1.0)], [(1, 5.0), (2, 3.0), (4, 1.0)]),
        # Equal loss at a higher cost is no improvement.
        ([(2, 2.0), (1, 2.0), (8, 2.0)], [(1, 2.0)]),
        # Strictly better with every step: all on the frontier.
        ([(1024, 9.0), (256, 11.0), (512, 10.0)], [(256, 11.0), (512, 10.0), (1024, 9.0)]),
    ],
)
def test_pareto_frontier(points, expected):
  assert sweep_report.pareto_frontier(points) == expected


def _result(row, lr, seed, ppl, kv=512, status="done"):
  return {
      "name": f"{row}_{lr}_{seed}",
      "row": row,
      "family": "MQA",
      "status": status,
      "error": "",
      "d_head": 32,
      "num_heads": 4,
      "num_kv_heads": 1,
      "num_layers": 4,
      "kv_layers": 4,
      "kv_bytes_per_token": kv,
      "params": 1000,
      "lr": lr,
      "seed": seed,
      "perplexity": ppl,
  }


def test_best_rows_take_the_lowest_mean_over_seeds():
  results = [
      _result("A", 1e-3, 0, 10.0),
      _result("A", 1e-3, 1, 12.0),  # mean 11
      _result("A", 2e-3, 0, 9.0),
      _result("A", 2e-3, 1, 9.5),  # mean 9.25, std sqrt(0.125)
      _result("A", 4e-3, 0, 8.0),
      _result("A", 4e-3, 1, 50.0, status="failed"),  # one seed only: 8
      _result("B", 1e-3, 0, 20.0, kv=256),
  ]
  best = {b["row"]: b for b in sweep_report.best_rows(results)}
  assert best["A"]["best_lr"] == 4e-3 and best["A"]["n"] == 1 and best["A"]["std"] == 0.0
  results[4]["perplexity"] = 10.0  # now lr 4e-3 (mean 10) loses to 2e-3
  best = {b["row"]: b for b in sweep_report.best_rows(results)}
  assert best["A"]["best_lr"] == 2e-3
  assert best["A"]["mean"] == pytest.approx(9.25) and best["A"]["std"] == pytest.approx(math.sqrt(0.125))
  assert best["A"]["other_lrs"] == {1e-3: pytest.approx(11.0), 4e-3: pytest.approx(10.0)}
  table = sweep_report.markdown_table(results)
  assert "| A | 32 | 4 | 1 | 4 | 512 | 1,000 | 0.002 | 2 | 9.25 ± 0.35 |" in table
  assert "| B | 32 | 4 | 1 | 4 | 256 | 1,000 | 0.001 | 1 | 20.00 |" in table
  assert "- failed: A_0.004_1" in table


def test_family_names():
  assert sweep.family(4, 1, "none") == "MQA"
  assert sweep.family(4, 1, "cla2") == "MQA+CLA2"
  assert sweep.family(1, 1, "cla2") == "MQA+CLA2"  # one query head, one KV head: still the MQA family
  assert sweep.family(4, 2, "none") == "GQA"
  assert sweep.family(4, 4, "cla3") == "MHA+CLA3"


def _families_drawn(png) -> set[str]:
  """The families whose colour (sweep_report.FAMILY_COLORS, at any opacity from 0.5 over white) covers some
  pixels of a decoded 960x660 PNG."""
  from matplotlib import colors, image  # pylint: disable=g-import-not-at-top

  ink = 1 - image.imread(png)[..., :3].astype(np.float64)  # how far each pixel is from white, per channel
  assert ink.shape == (660, 960, 3)  # 8 x 5.5 inches at 120 dpi: the whole figure was drawn
  drawn = set()
  for family, name in sweep_report.FAMILY_COLORS.items():
    full = 1 - np.array(colors.to_rgb(name))  # the colour's own distance from white
    used = full > 0.1  # channels that tell the opacity (tab:orange's red is all but white)
    opacity = ink[..., used] / full[used]  # equal across those channels only for this colour
    same = (np.ptp(opacity, axis=-1) < 0.04) & (opacity.mean(-1) >= 0.5) & (np.abs(ink[..., ~used]) < 0.1).all(-1)
    if same.sum() >= 20:  # a marker's worth of pixels, not an antialiased edge
      drawn.add(family)
  return drawn


def test_plots_draw_each_family_in_its_colour_and_no_other_family(tmp_path):
  """GQA and MHA have colours too, but no rows here: their colour must not appear."""
  results = [
      _result("H64-MQA", 2e-3, 0, 30.0, kv=256),
      _result("H64-MQA", 4e-3, 0, 28.0, kv=256),
      {**_result("H64-MQA-CLA2", 2e-3, 0, 29.0, kv=128), "family": "MQA+CLA2"},
      {**_result("H64-MQA-CLA2", 4e-3, 0, 31.0, kv=128), "family": "MQA+CLA2"},
  ]
  sweep_report.write_all(results, tmp_path)
  assert _families_drawn(tmp_path / "pareto.png") == {"MQA", "MQA+CLA2"}
  assert _families_drawn(tmp_path / "lr_sweep.png") == {"MQA", "MQA+CLA2"}


# -- Sweep files, overrides, flags --------------------------------------------------------------------------


def test_shipped_sweeps_list_their_runs():
  tiny = sweep.load_sweep("configs/sweeps/tiny_pareto.py", seeds=2)
  assert len(tiny) == 8 * 2 * 2 and len({r.name for r in tiny}) == len(tiny)
  for run in tiny:  # query width held equal to d_model in every row, as in the paper
    assert run.overrides["model.num_heads"] * run.overrides["model.head_dim"] == run.overrides["model.d_model"]
  paper = sweep.load_sweep("configs/sweeps/paper_1b.py", seeds=None)
  assert len(paper) == 20 * 7
  assert sorted({r.overrides["train.lr"] for r in paper}) == [3e-4, 4.5e-4, 6.75e-4, 1e-3, 1.5e-3, 2.25e-3, 3.375e-3]
  runner = sweep.Runner([r for r in paper if r.row in ("H128-MQA", "H64-MQA-CLA2")][::7], "/nonexistent", {})
  rows = {row["row"]: row for _, _, row in runner.entries}
  # The paper's Table 1: H128-MQA 10240 bytes/token, H64-MQA-CLA2 2560.
  assert rows["H128-MQA"]["kv_bytes_per_token"] == 10240 and rows["H64-MQA-CLA2"]["kv_bytes_per_token"] == 2560
  assert rows["H128-MQA"]["steps"] == 7153 and rows["H128-MQA"]["lr"] == 3e-4


def _learning_rates(spec: str) -> list[str]:
  """The sweep's learning rates, ascending, written as the docs write them ('3.375e-3')."""
  lrs = sorted({run.overrides["train.lr"] for run in sweep.load_sweep(spec, seeds=1)})
  return [f"{float(m):g}e{int(e)}" for m, e in (f"{lr:e}".split("e") for lr in lrs)]


def test_the_docs_state_the_shipped_learning_rate_grids():
  """docs/sweep.md and the README quote each shipped sweep's grid; a changed grid must change them too."""
  docs = (train_helpers.REPO_ROOT / "docs" / "sweep.md").read_text()
  readme = (train_helpers.REPO_ROOT / "README.md").read_text()
  low, high = _learning_rates("configs/sweeps/tiny_pareto.py")
  tiny = f"{low} and {high}"
  assert f"Learning rates {tiny}, 3 seeds" in docs and f"learning rates {tiny} with 3 seeds" in readme, tiny
  assert len(sweep.load_sweep("configs/sweeps/tiny_pareto.py", seeds=3)) == 48  # "48 runs" in both
  paper = _learning_rates("configs/sweeps/paper_1b.py")
  # x1.5 steps from 3e-4, rounded as the paper rounds them (1e-3, not 1.0125e-3).
  np.testing.assert_allclose([float(lr) for lr in paper], [3e-4 * 1.5**i for i in range(7)], rtol=0.02)
  assert f"({paper[0]} ... {paper[-1]})" in docs and f"({paper[0]} ... {paper[-1]})" in readme


def test_bad_overrides_and_flags_are_one_line_errors():
  good = sweep.Run("A", "configs/default.py", {"train.lr": 1e-3})
  runner = sweep.Runner(
      [
          good,
          sweep.Run("B", "configs/default.py", {"train.nope": 1}),
          sweep.Run("C", "configs/default.py", {"model.num_heads": "four"}),
          sweep.Run("D", "configs/paper_1b.py:H7-XYZ", {}),
      ],
      "/nonexistent",
      {},
  )
  status = {run.row: row for run, _, row in runner.entries}
  assert "status" not in status["A"]
  assert status["B"]["status"] == "failed" and "train.nope" in status["B"]["error"]
  assert status["C"]["status"] == "failed" and "model.num_heads" in status["C"]["error"]
  assert status["D"]["status"] == "failed" and "unknown 1B paper row" in status["D"]["error"]
  assert "INVALID" in sweep.format_dry_run(runner)
  with pytest.raises(UserError, match="--parallel"):
    sweep.check_parallel(0)
  with pytest.raises(UserError, match="--seeds"):
    sweep.load_sweep("configs/sweeps/tiny_pareto.py", seeds=0)
  with pytest.raises(UserError, match="not found"):
    sweep.load_sweep("configs/sweeps/nope.py", seeds=None)


def test_parallel_workers_split_the_gpus(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  assert sweep.device_env(2, 1)["CUDA_VISIBLE_DEVICES"] == "2,3"
  assert sweep.device_env(4, 0)["CUDA_VISIBLE_DEVICES"] == "0"
  assert sweep.device_env(1, 0)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
  sweep.check_parallel(2)
  with pytest.raises(UserError, match="cannot split 4 GPUs"):
    sweep.check_parallel(3)


def test_last_error_line():
  assert sweep.last_error("I0 noise\nerror: need train.lr > 0.\n") == "need train.lr > 0."
  assert sweep.last_error("Traceback (most recent call last):\n  x\nValueError: boom\n") == "ValueError: boom"


_FAKE_WORKER = """
import pathlib, signal, sys, time
run_dir = pathlib.Path(sys.argv[-1].split("=", 1)[1]).parent


def saved_and_exit(signum, frame):  # what the real worker does on SIGTERM: save a checkpoint, exit 0
  print("fake worker: SIGTERM", flush=True)
  sys.exit(0)


signal.signal(signal.SIGTERM, saved_and_exit)
(run_dir / "started").touch()
time.sleep(60)
sys.exit(3)
"""


def test_sigterm_to_the_runner_reaches_its_worker_and_leaves_the_run_pending(tmp_path, monkeypatch):
  """The runner forwards SIGTERM to the running worker, starts no further run and records no failure."""
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!{sys.executable}\n{_FAKE_WORKER}")
  fake.chmod(0o755)
  monkeypatch.setattr(sweep, "sys", types.SimpleNamespace(executable=str(fake)))  # the runner starts `fake`
  runs = [sweep.Run(row, "configs/default.py", {}, name=row) for row in ("A", "B")]
  runner = sweep.Runner(runs, str(tmp_path / "sweep"), {})
  first = tmp_path / "sweep" / runs[0].name

  def terminate_once_started():
    train_helpers.wait_for(lambda: (first / "started").exists(), timeout=60)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  sender = threading.Thread(target=terminate_once_started, daemon=True)
  started = time.time()
  sender.start()
  results = runner.run(log=lambda line: None)
  sender.join()
  assert time.time() - started < 30  # the worker exited on the forwarded signal, not after its 60 s sleep
  assert "fake worker: SIGTERM" in (first / sweep.LOG_FILE).read_text()
  assert not (tmp_path / "sweep" / runs[1].name / "started").exists()  # no run starts after the signal
  assert [r["status"] for r in results] == ["pending", "pending"]  # resumed by the next sweep, not failed
  assert not (first / "failed.json").exists()
  assert signal.getsignal(signal.SIGTERM) is before  # the runner's handler is gone once it returns


# -- The runner end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  base = tmp_path_factory.mktemp("sweep_corpus")
  train_helpers.enable_compilation_cache(base / "jax_cache")
  return train_helpers.write_corpus(base / "docs"), str(base / "cache")


def _tiny_overrides(corpus, steps=12):
  config = train_helpers.use_corpus(train_helpers.tiny_config(), corpus)
  config.model.update(num_kv_heads=1)
  config.train.update(steps=steps, log_every=4)
  config.checkpoint.update(every_steps=4, async_save=False)
  config.eval.update(max_tokens=2048)
  return {
      f"{section}.{key}": value
      for section in ("model", "data", "train", "checkpoint", "mesh", "eval")
      for key, value in config[section].items()
  }


def _write_sweep(path, base, runs):
  """A sweep file: `runs` as (row, extra overrides) on the tiny config."""
  lines = ["from cla_jax.sweep import Run", f"BASE = {base!r}", "def get_runs():", "  return ["]
  lines += [f"      Run({row!r}, 'configs/default.py', {{**BASE, **{extra!r}}})," for row, extra in runs]
  path.write_text("\n".join(lines + ["  ]", ""]))
  return str(path)


def _sweep_cmd(sweep_file, workdir, *flags):
  return [sys.executable, "-m", "cla_jax.cli.sweep", f"--sweep={sweep_file}", f"--workdir={workdir}", *flags]


def _run_sweep(sweep_file, workdir, *flags):
  return subprocess.run(
      _sweep_cmd(sweep_file, workdir, *flags),
      cwd=train_helpers.REPO_ROOT,
      env=train_helpers.env(),
      capture_output=True,
      text=True,
      timeout=400,
  )


def _rows(workdir):
  with open(os.path.join(workdir, "results.csv")) as f:
    return {r["name"]: r for r in csv.DictReader(f)}


def _worker_starts(run_dir):
  with open(os.path.join(run_dir, sweep.LOG_FILE)) as f:
    return f.read().count("sweep worker start")


@pytest.mark.slow
def test_sweep_trains_reports_skips_and_records_failures(tmp_path, corpus):
  base = _tiny_overrides(corpus)
  sweep_file = _write_sweep(
      tmp_path / "two.py",
      base,
      [("T-MQA", {"model.pattern": "none"}), ("T-MQA-CLA2", {"model.pattern": "cla2"}), ("T-BAD", {"train.lr": -1.0})],
  )  # valid as a config, refused by the trainer
  workdir = tmp_path / "sweep"
  out = _run_sweep(sweep_file, workdir, "--parallel=2")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "(2 at a time)" in out.stdout
  rows = _rows(workdir)
  for name, kv_layers in (("T-MQA_lr0.003_s0", 4), ("T-MQA-CLA2_lr0.003_s0", 2)):
    assert rows[name]["status"] == "done", rows[name]
    assert math.isfinite(float(rows[name]["perplexity"])) and float(rows[name]["perplexity"]) > 1
    # 16-bit K and V of one 16-wide KV head per KV layer.
    assert int(rows[name]["kv_bytes_per_token"]) == kv_layers * 2 * 16 * 2
    assert int(rows[name]["tokens"]) == 12 * 8 * 32
  assert rows["T-BAD_lr-1_s0"]["status"] == "failed"
  assert "train.lr must be a number > 0" in rows["T-BAD_lr-1_s0"]["error"]
  assert "\n" not in rows["T-BAD_lr-1_s0"]["error"]
  with open(workdir / "results.jsonl") as f:
    assert [json.loads(line)["name"] for line in f] == list(rows)
  for png in ("pareto.png", "lr_sweep.png"):
    assert {"MQA", "MQA+CLA2"} <= _families_drawn(workdir / png)
  table = (workdir / "results.md").read_text()
  assert "| T-MQA | 16 | 4 | 1 | 4 | 256 |" in table and "| T-MQA-CLA2 | 16 | 4 | 1 | 4 | 128 |" in table

  # A rerun trains nothing that finished (only the failed run is retried).
  out = _run_sweep(sweep_file, workdir)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "2 finished or invalid, 1 to train" in out.stdout
  assert _worker_starts(workdir / "T-MQA_lr0.003_s0") == 1 and _worker_starts(workdir / "T-MQA-CLA2_lr0.003_s0") == 1
  assert _rows(workdir)["T-MQA_lr0.003_s0"]["perplexity"] == rows["T-MQA_lr0.003_s0"]["perplexity"]


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_from_its_checkpoint(tmp_path, corpus):
  sweep_file = _write_sweep(tmp_path / "one.py", _tiny_overrides(corpus, steps=40), [("T-MQA", {})])
  workdir = tmp_path / "sweep"
  run_dir = workdir / "T-MQA_lr0.003_s0"
  # Own session: SIGKILL to the group takes the runner and its worker down at once, like a lost machine.
  proc = subprocess.Popen(
      _sweep_cmd(sweep_file, workdir),
      cwd=train_helpers.REPO_ROOT,
      env=train_helpers.env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
  )
  try:
    train_helpers.wait_for(lambda: (run_dir / "checkpoints" / "8").exists(), timeout=300, interval=0.05)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not (run_dir / "result.json").exists()
  out = _run_sweep(sweep_file, workdir)
  assert out.returncode == 0, out.stdout + out.stderr
  log = (run_dir / sweep.LOG_FILE).read_text()
  assert "resumed from checkpoint step" in log
  with open(run_dir / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps[-1] == 40 and steps.count(4) == 1  # the early steps were not trained again
  assert _rows(workdir)["T-MQA_lr0.003_s0"]["status"] == "done"
