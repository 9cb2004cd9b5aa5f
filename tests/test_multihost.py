"""Multi-process runs: the launch environment, and 2 processes x 2 CPU devices against 1 process x 4."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cla_jax import sharding
from tests import train_helpers as th

_FULL = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


def test_launch_env_gives_explicit_initialize_arguments():
  assert sharding.distributed_args(_FULL) == {
      "coordinator_address": "localhost:1234",
      "num_processes": 2,
      "process_id": 1,
  }
  assert sharding.distributed_args({"SLURM_NTASKS": "4"}) is None  # left to jax's auto-detection


@pytest.mark.parametrize(
    "change, message",
    [
        ({"JAX_PROCESS_ID": None}, "JAX_PROCESS_ID missing"),
        ({"JAX_NUM_PROCESSES": None, "JAX_PROCESS_ID": None}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID missing"),
        ({"JAX_COORDINATOR_ADDRESS": None}, "JAX_COORDINATOR_ADDRESS missing"),
        ({"JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"),
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "must be host:port"),
    ],
)
def test_partial_or_inconsistent_launch_env_is_an_error(change, message):
  environ = {k: v for k, v in {**_FULL, **change}.items() if v is not None}
  with pytest.raises(sharding.LaunchError, match=message):
    sharding.distributed_args(environ)


@pytest.mark.slow
def test_missing_process_id_is_one_error_line(tmp_path, tiny_config):
  env = {**th.env(), "JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}
  env.pop("JAX_PROCESS_ID", None)
  out = subprocess.run(
      th.train_cmd(tiny_config, tmp_path / "run"),
      cwd=th.REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 2, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert lines == [
      "error: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES set but JAX_PROCESS_ID missing: a "
      "multi-process launch sets all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID "
      "(or none, to run one process or auto-detect TPU / SLURM / Open MPI)."
  ], out.stderr
  assert not (tmp_path / "run").exists()  # nothing written before the launch is known to be sound


# ---------------------------------------------------------------------------------------------------------
# 2 processes x 2 CPU devices (scripts/launch_local.sh) against 1 process x 4 devices, mesh data=2 fsdp=2.
# The 1-process runs go through launch_local.sh too: a launched job sums its cross-device reductions with gloo
# whatever its process count, so 2 x 2 and 1 x 4 are bitwise equal (a plain `train.py` uses XLA's in-process
# collectives, which sum in another order: equal to ~1 ulp, checked at the end). Three launches in all:
#   launch 1 (2 processes): train 4 steps (checkpoints 2, 4)
#   launch 2 (1 process):   train 4 steps; resume the 2-process run's step-2 checkpoint
#   launch 3 (2 processes): resume the 1-process run's step-2 checkpoint, then eval.py the 2-process workdir
# ---------------------------------------------------------------------------------------------------------

_LAUNCH = str(th.REPO_ROOT / "scripts" / "launch_local.sh")


def _config(corpus):
  config = th.use_corpus(th.tiny_config(), corpus, num_devices=-1, mesh=(2, 2, 1))
  config.train.update(steps=4, log_every=1)
  config.checkpoint.update(every_steps=2)
  config.eval.update(batch_size=8, max_tokens=1024)
  return config


def _launch(tmp_path, name, num_processes, *commands, timeout=600):
  """Runs `commands` (argv lists, one after the other) in `num_processes` processes sharing 4 CPU devices."""
  script = " && ".join(subprocess.list2cmdline(c) for c in commands)
  env = {
      **th.env(),
      "DEVICES_PER_PROCESS": str(4 // num_processes),
      "LOG_DIR": str(tmp_path / name),
      "PYTHON": sys.executable,
  }
  out = subprocess.run(
      [_LAUNCH, str(num_processes), "bash", "-c", script],
      cwd=th.REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  logs = [(tmp_path / name / f"process_{i}.log").read_text() for i in range(num_processes)]
  assert out.returncode == 0, f"{out.stderr}\n" + "\n".join(
      f"--- process {i}:\n{log[-3000:]}" for i, log in enumerate(logs)
  )
  return logs


def _drop_last_checkpoint(src, dst):
  """A copy of workdir `src` as if its job had died after step 2."""
  shutil.copytree(src, dst)
  shutil.rmtree(dst / "checkpoints" / "4")


@pytest.mark.slow
def test_two_processes_train_resume_and_eval_like_one(tmp_path_factory):
  from cla_jax import evaluate, trainer  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("multihost")
  corpus = th.write_corpus(root / "text"), str(root / "cache")
  config = _config(corpus)

  # 2 processes first: process 0 trains the sentencepiece tokenizer into the shared cache, then the other loads it.
  two, one = root / "two", root / "one"
  logs = _launch(root, "train", 2, th.train_cmd(config, two))
  assert "2 process(es)" in logs[0] and "step 4/4" in logs[0]
  assert "step 4/4" not in logs[1] and "initialised" not in logs[1]  # only process 0 logs
  assert len(os.listdir(two / "tensorboard")) == 1
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]

  # 1 process x 4 devices, uninterrupted; then the 2-process step-2 checkpoint resumed by 1 process.
  _drop_last_checkpoint(two, root / "two_then_one")
  _launch(root, "one", 1, th.train_cmd(config, one), th.train_cmd(config, root / "two_then_one"))
  want = th.losses(one)
  assert sorted(want) == [1, 2, 3, 4]
  assert th.losses(two) == want  # bitwise
  assert th.losses(root / "two_then_one") == want

  # ... and the other way round, then eval.py under 2 processes, in one launch.
  _drop_last_checkpoint(one, root / "one_then_two")
  eval_cmd = [sys.executable, str(th.REPO_ROOT / "eval.py"), f"--workdir={two}", "--progress=false"]
  generate_cmd = [
      sys.executable,
      str(th.REPO_ROOT / "generate.py"),
      f"--workdir={two}",
      "--prompt=the cat",
      "--max_new_tokens=6",
      "--jsonl",
  ]
  logs = _launch(root, "resume_eval", 2, th.train_cmd(config, root / "one_then_two"), generate_cmd, eval_cmd)
  assert "resumed from checkpoint step 2" in logs[0]
  assert th.losses(root / "one_then_two") == want
  evaluated = json.loads(logs[0].strip().splitlines()[-1])
  expected = evaluate.run(str(two), overrides={"mesh.num_devices": 4}, progress=False, write=False)
  assert evaluated["tokens"] == expected["tokens"] > 0
  assert evaluated["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
  assert os.listdir(two / "eval") == ["validation_step4.json"]
  # generate.py under the launch: each process continues the prompt on its own device, as one process does.
  import cla_jax  # pylint: disable=g-import-not-at-top

  want_text = cla_jax.load_model(str(two)).generate(["the cat"], max_new_tokens=6)[0]
  assert want_text.strip()  # some text to compare, not an immediate EOS
  for log in logs:
    generated = [json.loads(line) for line in log.splitlines() if line.startswith('{"prompt"')]
    assert [g["continuation"] for g in generated] == [want_text], log[-2000:]

  # A plain 1-process run (XLA's in-process collectives, no launch) differs from the launched runs by rounding only.
  plain = th.use_corpus(_config(corpus), corpus, num_devices=4, mesh=(2, 2, 1))
  trainer.run(plain, str(root / "plain"))
  got = th.losses(root / "plain")
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-6)
