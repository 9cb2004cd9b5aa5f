"""Multi-process runs: the launch environment, and 2 processes x 2 CPU devices against 1 process x 4."""

import subprocess
import sys

import pytest

import train_helpers as th
from cla_jax import sharding

_FULL = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


def test_launch_env_gives_explicit_initialize_arguments():
  assert sharding.distributed_args(_FULL) == {"coordinator_address": "localhost:1234", "num_processes": 2,
                                              "process_id": 1}
  assert sharding.distributed_args({"SLURM_NTASKS": "4"}) is None  # left to jax's auto-detection


@pytest.mark.parametrize("change, message", [
    ({"JAX_PROCESS_ID": None}, "JAX_PROCESS_ID missing"),
    ({"JAX_NUM_PROCESSES": None, "JAX_PROCESS_ID": None}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID missing"),
    ({"JAX_COORDINATOR_ADDRESS": None}, "JAX_COORDINATOR_ADDRESS missing"),
    ({"JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "must be host:port"),
])
def test_partial_or_inconsistent_launch_env_is_an_error(change, message):
  environ = {k: v for k, v in {**_FULL, **change}.items() if v is not None}
  with pytest.raises(sharding.LaunchError, match=message):
    sharding.distributed_args(environ)


def test_missing_process_id_is_one_error_line(tmp_path, tiny_config):
  env = {**th.env(), "JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}
  env.pop("JAX_PROCESS_ID", None)
  out = subprocess.run(th.train_cmd(tiny_config, tmp_path / "run"), cwd=th.REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert lines == ["error: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES set but JAX_PROCESS_ID missing: a "
                   "multi-process launch sets all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID "
                   "(or none, to run one process or auto-detect TPU / SLURM / Open MPI)."], out.stderr
  assert not (tmp_path / "run").exists()  # nothing written before the launch is known to be sound
