"""Never lose a good checkpoint: divergence guard, fingerprints, workdir lock, disk full, bad input."""

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pytest

from cla_jax import checkpoint, config_lib, health, trainer
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from tests import train_helpers as th


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
  """A healthy 6-step run saving every step and keeping 3 (steps 4, 5, 6 on disk)."""
  config = th.config_on(corpus, steps=6)
  config.checkpoint.update(every_steps=1, keep=3)
  workdir = tmp_path_factory.mktemp("trained") / "run"
  trainer.run(config, str(workdir))
  return config, workdir


def test_preservation_policy_keeps_the_verified_step_whatever_keep_says():
  class Info:

    def __init__(self, step):
      self.step = step

  infos = [Info(s) for s in range(1, 7)]
  policy = checkpoint.KeepNewestAndVerified(keep=2, verified=3)
  assert [i.step for i, keep in zip(infos, policy.should_preserve(infos, context=None)) if keep] == [3, 5, 6]
  policy.verified = None
  assert [i.step for i, keep in zip(infos, policy.should_preserve(infos, context=None)) if keep] == [5, 6]


@pytest.mark.slow
@pytest.mark.parametrize(
    "lr, problem",
    [
        (1e2, r"loss [\d.e+]+ is above train.divergence_spike_factor=5 x its running median"),  # finite, ~1e4
        (1e4, r"the model is dead: gradient norm 0"),  # collapses to the uniform prediction
        (1e6, r"(loss|gradient norm) is (nan|inf)"),
    ],
)
def test_divergence_keeps_and_names_a_really_good_checkpoint(tmp_path, trained, lr, problem):
  config, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  config = config_lib.from_json(config_lib.to_json(config))
  with config.unlocked():
    config.train.update(steps=12, lr=lr)
  with pytest.raises(health.DivergenceError, match=problem) as err:
    trainer.run(config, str(workdir))
  message = str(err.value)
  assert "\n" not in message and "passed the health check is step 6 " in message
  # Step 7 was saved from the update that ruined the model; it is moved aside, never named as good.
  assert workdir_lib.latest_step(workdir) == 6
  assert [d.split("-")[0] for d in os.listdir(workdir / workdir_lib.DIVERGED_DIR)] == ["7"]
  params, _, _ = workdir_lib.restore_params(workdir)
  original, _, _ = workdir_lib.restore_params(source, step=6)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(original)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_dead_model_from_init_is_stopped(tmp_path, corpus):
  config = th.config_on(corpus, steps=4)
  config.model.init_std = 1e6
  with pytest.raises(health.DivergenceError, match="model is dead|is nan|is inf|above train.divergence") as err:
    trainer.run(config, str(tmp_path))
  assert "No checkpoint has passed the health check yet" in str(err.value)


def test_health_check_unit():
  train = th.tiny_config().train
  check = health.HealthCheck(train, vocab_size=256)
  for loss in (5.6, 5.0, 4.0, 3.0):
    assert check.problem(loss, 1.0) is None
  assert "above" in check.problem(5.0 * 4.5 + 0.1, 1.0)  # median of (5.6, 5.0, 4.0, 3.0) is 4.5
  assert "dead" in check.problem(np.log(256), 1e-8)
  small = health.HealthCheck(train, vocab_size=256)
  assert small.problem(0.05, 1.0) is None and small.problem(0.4, 1.0) is None  # 8x, but only 0.35 nats up
  assert "nan" in check.problem(float("nan"), 1.0)
  train.divergence_max_grad_norm = 10.0
  assert "divergence_max_grad_norm" in health.HealthCheck(train, 256).problem(5.0, 11.0)
  train.divergence_check = False
  off = health.HealthCheck(train, 256)
  assert off.problem(1e9, 0.0) is None and "inf" in off.problem(float("inf"), 1.0)


@pytest.mark.slow
def test_flipped_bytes_in_a_params_file_fall_back_with_one_warning(tmp_path, tiny_config, capfd):
  p1, p2 = (model_lib.init_params(config_lib.model_config(tiny_config), jax.random.key(s)) for s in (1, 2))
  workdir_lib.save_params_only(tmp_path, p1, tiny_config, step=1)
  manager = workdir_lib.checkpoint_manager(tmp_path, async_save=False)
  checkpoint.save(manager, 2, p2, None, {})
  manager.wait_until_finished()
  manager.close()
  data_files = [
      p for p in (tmp_path / "checkpoints" / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d"
  ]
  biggest = max(data_files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2 : len(data) // 2 + 8] = b"\x7f" * 8  # 8 bytes of bit rot inside the stored weights
  biggest.write_bytes(bytes(data))
  capfd.readouterr()
  params, _, step = workdir_lib.restore_params(tmp_path)
  assert step == 1
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = capfd.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "fingerprint mismatch" in warnings[0], err
  assert "Traceback" not in err


def test_fingerprint_is_independent_of_sharding_and_sees_one_changed_element():
  x = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  assert checkpoint.fingerprints({"x": x}) == checkpoint.fingerprints({"x": sharded})
  # An independent reference: the same position-weighted sum in numpy's wrapping uint32 arithmetic.
  bits = x.view(np.uint32).ravel().astype(np.uint64)
  weights = ((np.arange(x.size, dtype=np.uint64) * 2 + 1) * 2654435761) % 2**32
  assert checkpoint.fingerprints({"x": x})["['x']"] == int((bits * weights % 2**32).sum() % 2**32)
  y = x.copy()
  y[5, 7] = np.nextafter(y[5, 7], np.inf)
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  values = {checkpoint.fingerprints({"x": v})["['x']"] for v in (x, y, swapped)}
  assert len(values) == 3


@pytest.mark.slow
def test_second_trainer_on_a_live_workdir_refuses_and_a_dead_lock_does_not_block(tmp_path, corpus):
  config = th.config_on(corpus, steps=5000)
  config.checkpoint.update(every_steps=2)
  workdir = tmp_path / "run"
  first = th.start(config, workdir)
  try:
    th.wait_for(lambda: (workdir / "checkpoints" / "2").exists() or first.poll() is not None)
    assert first.poll() is None, open(f"{workdir}.log").read()
    config_before = (workdir / "config.json").read_text()
    other = th.config_on(corpus, steps=7, lr=1e-4)
    second = th.run(other, workdir)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"is in use by pid {first.pid} on host " in second.stderr and "Traceback" not in second.stderr
    assert (workdir / "config.json").read_text() == config_before  # the second run changed nothing
  finally:
    first.kill()  # SIGKILL: its lock file stays behind, but the kernel dropped the lock
    first.wait(timeout=60)
  assert (workdir / "lock").exists()
  killed_at = workdir_lib.latest_step(workdir)
  config.train.steps = killed_at + 2
  third = th.run(config, workdir)
  assert third.returncode == 0, third.stderr
  assert f"resumed from checkpoint step {killed_at}" in third.stdout


def _mount(kind: str, target: pathlib.Path, *options: str, skip: bool = True) -> bool:
  """mount(8) as root (a small tmpfs, a read-only bind); skips the test (or returns False) where not allowed."""
  import subprocess  # pylint: disable=g-import-not-at-top

  target.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(["mount", *kind.split(), *options, str(target)], capture_output=True, text=True)
  if result.returncode and skip:
    pytest.skip(f"cannot mount here ({result.stderr.strip()}); needs root")
  return not result.returncode


def _umount(target: pathlib.Path) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top

  if subprocess.run(["umount", str(target)], check=False, capture_output=True).returncode:
    # Busy (a library still holds a file open): detach it now, so no mount outlives the test session.
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def _small_disk(tmp_path: pathlib.Path, corpus) -> Iterator[tuple[pathlib.Path, Any]]:
  """A 3 MiB tmpfs (room for one checkpoint of the tiny model, not two) and a config saving every step."""
  small = tmp_path / "small"
  _mount("-t tmpfs", small, "-o", "size=3M", "tmpfs")
  try:
    config = th.config_on(corpus, steps=30)
    config.checkpoint.update(every_steps=1, keep=100)
    yield small, config
  finally:
    _umount(small)


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_earlier_checkpoints(tmp_path, corpus):
  with _small_disk(tmp_path, corpus) as (small, config):
    result = th.run(config, small / "run")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: disk full: ") and "MiB free but checkpoint step 2 needs about" in line
    assert "checkpoints [1] are intact" in line
    params, _, step = workdir_lib.restore_params(small / "run")
    assert step == 1 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_eval_on_a_read_only_workdir_returns_the_result_and_warns(tmp_path, trained, capfd):
  from cla_jax import evaluate  # pylint: disable=g-import-not-at-top

  _, source = trained
  read_only = tmp_path / "ro"
  _mount("--bind", read_only, str(source))
  try:
    _mount("-o remount,ro,bind", read_only)
    result = evaluate.run(str(read_only), max_tokens=256, progress=False)
    assert result["step"] == 6 and np.isfinite(result["loss"])
    err = capfd.readouterr().err
    assert "warning: could not write" in err and "Traceback" not in err
    assert not (source / "eval").exists()
  finally:
    _umount(read_only)


def test_partial_metrics_line_is_skipped_and_the_next_run_starts_a_new_line(tmp_path, capsys):
  from cla_jax import metrics  # pylint: disable=g-import-not-at-top

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')  # killed mid-write
  records, skipped = metrics.read_jsonl_counted(str(path))
  assert [r["step"] for r in records] == [1, 2] and skipped == 1
  writer = metrics.MetricWriter(str(tmp_path), total_steps=5, enabled=True)
  writer.write(3, {"loss": 3.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": 0.1, "step_time": 1.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2, 3]
  assert "skipped 1 unreadable line(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.clip_norm", -1.0),
        ("train.b1", 1.0),
        ("train.b2", -0.1),
        ("train.weight_decay", -0.1),
        ("train.eval_batches", 0),
        ("train.lr", 0.0),
        ("train.warmup_frac", 1.0),
        ("data.seed", -1),
        ("data.prefetch", -1),
        ("checkpoint.keep", 0),
        ("eval.batch_size", 0),
        ("train.divergence_spike_factor", 0.5),
        ("train.divergence_window", 0),
        ("train.divergence_max_grad_norm", -1.0),
    ],
)
def test_bad_config_values_are_refused_in_one_line(field, value):
  config = th.tiny_config()
  section, name = field.split(".")
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.check_values(config)
  assert str(err.value).startswith(f"{field} must be ") and "\n" not in str(err.value)


@pytest.mark.slow
def test_bad_command_lines_exit_2_with_one_line_and_no_side_effects(tmp_path, trained, corpus):
  """Each: exit 2, one stderr line naming the problem, no traceback, no file left in a workdir."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  _, good = trained
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(bytes(range(256)) * 8)
  bad_sweep = tmp_path / "bad_sweep.py"
  bad_sweep.write_text("def get_runs(:\n  return []\n")
  good_sweep = tmp_path / "good_sweep.py"
  good_sweep.write_text("from cla_jax.sweep import Run\ndef get_runs():\n  return [Run('A', 'configs/default.py')]\n")
  read_only = tmp_path / "ro"
  mounted = _mount("-t tmpfs", read_only, "-o", "size=1M,ro", "tmpfs", skip=False)  # needs root
  ok = th.overrides(th.use_corpus(th.tiny_config(), corpus))
  train, ev = ["train.py", "--config=configs/default.py"], ["eval.py", f"--workdir={good}"]
  cases = [  # (argv, words the line must hold, workdir that must stay absent/unchanged)
      (["train.py", "--config=configs/nope.py", f"--workdir={tmp_path / 'w1'}"], "configs/nope.py' not found", "w1"),
      (
          ["train.py", "--config=configs/nope.py", f"--workdir={tmp_path / 'w2'}", "--config.train.steps=3"],
          "not found",
          "w2",
      ),
      ([*train, f"--workdir={a_file}", *ok], "is a file, not a directory", None),
      ([*train, f"--workdir={a_file}/run", *ok], "cannot write to --workdir", None),
      *([([*train, f"--workdir={read_only}/run", *ok], "cannot write to --workdir", None)] if mounted else []),
      (
          [*train, f"--workdir={tmp_path / 'w3'}", *ok, "--config.model.attention_impl=cudnn"],
          "model.attention_impl=cudnn needs an NVIDIA GPU",
          "w3",
      ),
      ([*train, f"--workdir={tmp_path / 'w4'}", *ok, "--config.data.seed=-1"], "data.seed must be", "w4"),
      ([*train, f"--workdir={tmp_path / 'w5'}", *ok, "--config.train.clip_norm=-1"], "train.clip_norm must", "w5"),
      ([*ev, "--batch_size=0"], "--batch_size=0 must be at least 1", None),
      ([*ev, "--config.model.x=3"], "--config.model.x: no such config field", None),
      ([*ev, f"--text_file={binary}"], "is not UTF-8 text", None),
      (["-m", "cla_jax.cli.describe", "--config=configs/nope.py"], "configs/nope.py' not found", None),
      # Issue 27: the newer commands, and config errors that used to leave files behind or read badly.
      (["generate.py", f"--workdir={good}", f"--prompt_file={binary}"], "is not UTF-8 text", None),
      (
          [*train, f"--workdir={tmp_path / 'w6'}", *ok, "--config.train.seq_len=100000"],
          "fewer than train.seq_len",
          "w6",
      ),
      (
          [*train, f"--workdir={tmp_path / 'w7'}", *ok, "--config.model.num_layerz=3"],
          '(did you mean "num_layers"?)',
          "w7",
      ),
      (
          ["-m", "cla_jax.cli.sweep", f"--sweep={bad_sweep}", f"--workdir={tmp_path / 'w8'}"],
          "line 1: invalid syntax",
          "w8",
      ),
      (["-m", "cla_jax.cli.sweep", f"--sweep={good_sweep}", f"--workdir={a_file}"], "is a file, not a directory", None),
      (["-m", "cla_jax.cli.prepare", f"--output={a_file}", *ok], "--output=", None),
      *(
          [(["-m", "cla_jax.cli.export_hf", f"--workdir={good}", f"--out={read_only}/hf"], "not writable", None)]
          if mounted
          else []
      ),
  ]

  def run(argv):
    return subprocess.run(
        [th.sys.executable, *argv], cwd=th.REPO_ROOT, env=th.env(), capture_output=True, text=True, timeout=300
    )

  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(run, [argv for argv, _, _ in cases]))
  finally:
    if mounted:
      _umount(read_only)
  for (argv, words, workdir), result in zip(cases, results):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (argv, result.stderr[-2000:])
    assert lines[0].startswith("error: ") and words in lines[0] and "Traceback" not in result.stderr, (argv, lines)
    if workdir:
      assert not (tmp_path / workdir).exists(), argv
  assert not (good / "eval").exists()


def _python_cli(code: str, *args: str):
  """Runs `code` (defining main(argv)) under cli.start in a fresh Python, as a command would: its real stderr."""
  import subprocess  # pylint: disable=g-import-not-at-top

  program = f"import sys\nfrom cla_jax import cli\n{code}\ncli.start(main)\n"
  return subprocess.run(
      [th.sys.executable, "-c", program, *args],
      cwd=th.REPO_ROOT,
      env=th.env(),
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.slow
def test_disk_filling_during_a_save_is_one_error_and_no_library_traceback(tmp_path, corpus):
  with _small_disk(tmp_path, corpus) as (small, config):
    # The free-space check before each save passes (as when another writer fills the disk during the save),
    # so orbax itself runs out of space half way through writing step 2.
    code = f"""
from cla_jax import checkpoint, config_lib, trainer
checkpoint._free_bytes = lambda directory: 2**40
def main(argv):
  trainer.run(config_lib.from_json({config_lib.to_json(config)!r}), sys.argv[1])
"""
    result = _python_cli(code, str(small / "run"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()  # no orbax log, asyncio task or callback traceback before it
    assert len(lines) == 1, result.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: disk full") and "checkpoints [1] are intact" in line, line
    params, _, step = workdir_lib.restore_params(small / "run")
    assert step == 1 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_with_one_warning_line(tmp_path, trained):
  _, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  data_files = [
      p for p in (workdir / "checkpoints" / "6" / "params").rglob("*") if p.is_file() and p.parent.name == "d"
  ]
  biggest = max(data_files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])  # a copy or a disk that stopped part way
  code = """
from cla_jax import workdir as workdir_lib
def main(argv):
  params, _, step = workdir_lib.restore_params(sys.argv[1])
  print(step)
"""
  result = _python_cli(code, str(workdir))
  assert result.returncode == 0 and result.stdout.split() == ["5"], result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 6 ") and "unreadable" in lines[0], lines
  assert "TensorStore details" not in lines[0]


def test_verified_step_file_waits_for_its_checkpoint_to_commit(tmp_path):
  """After kill -9 mid-save, verified_step.json must not name a step that is only an orbax temporary dir."""
  import types  # pylint: disable=g-import-not-at-top

  class Manager:
    saving, steps = True, [4]

    def is_saving_in_progress(self):
      return self.saving

    def all_steps(self):
      return self.steps

  fake = types.SimpleNamespace(
      workdir=str(tmp_path), manager=Manager(), policy=checkpoint.KeepNewestAndVerified(keep=2), _verified_on_disk=None
  )
  fake._record_verified = types.MethodType(trainer.Trainer._record_verified, fake)  # pylint: disable=protected-access
  trainer.Trainer._mark_verified(fake, 5)  # step 6 passed; checkpoint 5 is still being written
  assert fake.policy.verified == 5 and workdir_lib.read_verified_step(tmp_path) is None
  fake.manager.saving = False  # committed? only once it is listed as a step
  fake._record_verified()  # pylint: disable=protected-access
  assert workdir_lib.read_verified_step(tmp_path) is None
  fake.manager.steps = [4, 5]
  fake._record_verified()  # pylint: disable=protected-access
  assert workdir_lib.read_verified_step(tmp_path) == 5
