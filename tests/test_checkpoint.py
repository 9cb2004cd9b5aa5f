"""Checkpoint API: params-only save/restore, fallback past an unreadable latest checkpoint, clear errors."""

import os
import pathlib

import jax
import numpy as np
import pytest

from cla_jax import checkpoint, config_lib, trainer
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from tests import train_helpers as th


def _params(config, seed):
  return model_lib.init_params(config_lib.model_config(config), jax.random.key(seed))


def _corrupt(step_dir: pathlib.Path) -> None:
  """Overwrites every file of a checkpoint's params with garbage (a torn write / bad disk)."""
  for path in (step_dir / "params").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\x00garbage")


def _assert_tree_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_params_only_roundtrip_and_fallback(tmp_path, tiny_config, capfd):
  workdir = tmp_path / "run"
  p0, p1 = _params(tiny_config, 0), _params(tiny_config, 1)
  workdir_lib.save_params_only(workdir, p0, tiny_config, step=5)
  manager = workdir_lib.checkpoint_manager(workdir, async_save=False)
  checkpoint.save(manager, 9, p1, None, {})
  manager.wait_until_finished()
  manager.close()
  params, config, step = workdir_lib.restore_params(workdir)
  assert step == 9 and config.model.to_dict() == tiny_config.model.to_dict()
  _assert_tree_equal(params, p1)

  _corrupt(workdir / "checkpoints" / "9")
  capfd.readouterr()
  params, _, step = workdir_lib.restore_params(workdir)  # falls back, warns, deletes nothing
  assert step == 5
  err = capfd.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint step 9 " in warnings[0] and "Traceback" not in err, err
  _assert_tree_equal(params, p0)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["5", "9"]
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 9 .* is unreadable"):
    workdir_lib.restore_params(workdir, step=9)


def test_clear_errors(tmp_path, tiny_config):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    workdir_lib.restore_params(tmp_path / "missing")
  workdir_lib.write_config(tmp_path, tiny_config)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoints/ directory"):
    workdir_lib.restore_params(tmp_path)
  workdir_lib.save_params_only(tmp_path / "run", _params(tiny_config, 0), tiny_config)
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint for step 3 .* available steps: \[0\]"):
    workdir_lib.restore_params(tmp_path / "run", step=3)
  # A config.json whose model no longer matches the stored params.
  bigger = tiny_config.copy_and_resolve_references()
  bigger.model.d_model = 96
  workdir_lib.write_config(tmp_path / "run", bigger)
  with pytest.raises(checkpoint.CheckpointError, match="does not match the model config"):
    workdir_lib.restore_params(tmp_path / "run")


@pytest.mark.slow
def test_trainer_resumes_past_a_corrupted_latest_checkpoint(tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("corrupt")
  th.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  config = th.use_corpus(tiny_config, (th.write_corpus(root / "text"), str(root / "cache")))
  config.train.update(steps=4, log_every=1)
  config.checkpoint.update(every_steps=2)
  workdir = root / "run"
  trainer.run(config, str(workdir))
  first = th.losses(workdir)
  _corrupt(workdir / "checkpoints" / "4")
  trainer.run(config, str(workdir))  # warns, moves step 4 aside, resumes from step 2
  again = th.losses(workdir)
  assert [again[s] for s in (3, 4)] == [first[s] for s in (3, 4)]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  (moved,) = os.listdir(workdir / workdir_lib.CORRUPT_DIR)
  assert moved.startswith("4-") and (workdir / workdir_lib.CORRUPT_DIR / moved / "params").is_dir()


def test_relative_workdir_restores(tmp_path, tiny_config, monkeypatch):
  """`eval.py --workdir=runs/default` (the README's quick start) passes a relative path."""
  monkeypatch.chdir(tmp_path)
  params = _params(tiny_config, 0)
  workdir_lib.save_params_only("runs/rel", params, tiny_config, step=3)
  restored, _, step = workdir_lib.restore_params("runs/rel")
  assert step == 3
  _assert_tree_equal(restored, params)


def test_an_abandoned_orbax_write_future_is_not_logged_but_other_lost_futures_are(caplog):
  """asyncio logs a Future whose error nobody read when it is collected; orbax's failed writes leave such."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top

  checkpoint._quiet_orbax_errors()
  loop = asyncio.new_event_loop()
  try:
    for message in (
        'RESOURCE_EXHAUSTED: Error writing "w/0" at "/x/run/checkpoints/2.orbax-checkpoint-tmp/d/1": No space left',
        "an unrelated failure",
    ):
      future = loop.create_future()
      future.set_exception(ValueError(message))
      del future
      gc.collect()
  finally:
    loop.close()
  lost = [r.getMessage() for r in caplog.records if "exception was never retrieved" in r.getMessage()]
  assert len(lost) == 1 and "an unrelated failure" in lost[0], lost
