"""Training end to end: loss falls, exact resume after a real kill, SIGTERM, non-finite loss, bad configs."""

import json
import math
import os
import signal

import numpy as np
import pytest

from cla_jax import config_lib, metrics, trainer
from cla_jax import workdir as workdir_lib
from tests import train_helpers as th


@pytest.mark.slow
def test_loss_falls_on_default_config(tmp_path, corpus):
  config = th.use_corpus(config_lib.load("configs/default.py"), corpus)
  # The default model and optimizer; a smaller batch and run so that it takes seconds on CPU.
  # A peak no CPU reaches: every logged MFU is then a real fraction, never the writer's "above 100%" nan.
  config.train.update(steps=16, batch_size=2, log_every=1, eval_every=16, peak_flops_per_device=1e15)
  trainer.run(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records]
  assert len(losses) == 16
  assert losses[0] > math.log(config.model.vocab_size) - 0.5  # starts near uniform
  assert np.mean(losses[-3:]) < losses[0] - 2.0, losses
  last = records[-1]
  for key in ("step", "loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time", "eval_loss"):
    assert key in last
  assert last["perplexity"] == pytest.approx(math.exp(last["loss"]), rel=1e-6)
  # MFU = model FLOPs per second / the peak, recomputed here from the logged throughput and FLOPs per token
  # (test_metrics checks that one above 100% is logged as unknown).
  peak = config.train.peak_flops_per_device * config.mesh.num_devices
  per_token = metrics.flops_per_token(config_lib.model_config(config), config.train.seq_len)
  for r in records:
    assert isinstance(r["mfu"], float) and 0 < r["mfu"] < 1e-2, r
    assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / peak, rel=1e-6), r
  assert last["eval_loss"] < losses[0] - 1.0
  assert os.listdir(tmp_path / "tensorboard")
  assert workdir_lib.read_config(tmp_path).train.steps == 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
  """An uninterrupted in-process run whose per-step losses the interrupted runs must reproduce."""
  config = th.config_on(corpus, steps=40)
  config.checkpoint.update(every_steps=5)
  workdir = tmp_path_factory.mktemp("reference") / "run"
  trainer.run(config, str(workdir))
  return config, th.losses(workdir)


@pytest.mark.slow
def test_killed_process_resumes_with_identical_losses(tmp_path, reference):
  config, expected = reference
  workdir = tmp_path / "run"
  killed_at = th.kill_after_checkpoint(config, workdir, 10)  # a hard kill: no handler, no final checkpoint
  assert 10 <= killed_at < 40
  result = th.run(config, workdir)
  assert result.returncode == 0, result.stderr
  assert f"resumed from checkpoint step {killed_at}" in result.stdout
  got = th.losses(workdir)
  assert sorted(got) == list(range(1, 41))
  np.testing.assert_array_equal([got[s] for s in range(1, 41)], [expected[s] for s in range(1, 41)])


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path, reference):
  config, expected = reference
  workdir = tmp_path / "run"
  proc = th.start(config, workdir)
  try:
    th.wait_for(
        lambda: (workdir / "metrics.jsonl").exists() and len(th.losses(workdir)) >= 7 or proc.poll() is not None
    )
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  log = open(f"{workdir}.log").read()
  assert proc.returncode == 0, log
  assert "preempted (SIGTERM): saved checkpoint step" in log
  stopped_at = workdir_lib.latest_step(workdir)
  assert 7 <= stopped_at < 40 and max(th.losses(workdir)) == stopped_at
  result = th.run(config, workdir)
  assert result.returncode == 0, result.stderr
  assert f"resumed from checkpoint step {stopped_at}" in result.stdout
  got = th.losses(workdir)
  np.testing.assert_array_equal([got[s] for s in range(1, 41)], [expected[s] for s in range(1, 41)])


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_no_unverified_checkpoint(tmp_path, corpus):
  config = th.config_on(corpus, steps=4, lr=1e30, warmup_frac=0.0)
  config.checkpoint.update(every_steps=1, keep=100)
  with pytest.raises(trainer.NonFiniteLossError, match=r"(loss|gradient norm) is (nan|inf) at step (\d+)") as err:
    trainer.run(config, str(tmp_path))
  bad_step = int(err.value.args[0].split(" at step ")[1].split(";")[0])
  # Checkpoint bad_step-1 holds the params that produced the bad loss: it is moved aside, not kept as "good".
  saved = workdir_lib.latest_step(tmp_path)
  assert saved is None or saved <= bad_step - 2
  assert os.listdir(tmp_path / workdir_lib.DIVERGED_DIR)[0].startswith(f"{bad_step - 1}-")
  if saved is not None:
    assert f"passed the health check is step {saved} " in str(err.value)
    params, _, step = workdir_lib.restore_params(tmp_path)
    import jax  # pylint: disable=g-import-not-at-top

    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  else:
    assert "No checkpoint has passed the health check yet" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(mesh=dict(data=3)), "mesh data*fsdp*tensor = 3*1*1 = 3 does not match the 8 devices"),
        (dict(train=dict(batch_size=12)), "cannot be split over mesh data*fsdp = 8 devices"),
        (dict(train=dict(grad_accum_steps=3)), "not divisible by train.grad_accum_steps=3"),
    ],
)
def test_bad_values_are_one_line_errors_in_process(tmp_path, tiny_config, corpus, override, message):
  config = th.use_corpus(tiny_config, corpus, num_devices=-1, mesh=(-1, 1, 1))
  for section, values in override.items():
    config[section].update(**values)
  with pytest.raises(trainer.UserError) as err:
    trainer.run(config, str(tmp_path))
  assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_bad_mesh_from_the_command_line(tmp_path, tiny_config, corpus):
  config = th.use_corpus(tiny_config, corpus, num_devices=-1, mesh=(-1, 3, 1))
  result = th.run(config, tmp_path / "run")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: mesh ")
  assert "Traceback" not in result.stderr
