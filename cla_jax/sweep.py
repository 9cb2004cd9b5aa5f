"""Runs a sweep of training runs and reports the accuracy / KV-cache trade-off.

    cla-sweep --sweep=configs/sweeps/tiny_pareto.py --workdir=DIR [--parallel=N] [--only=REGEX]
        [--seeds=N] [--dry_run] [--config.train.steps=600 ...]

A sweep file is plain Python with `get_runs(seeds: int = ...) -> list[Run]`. Each run trains in its own
`DIR/<run name>/` with the project's trainer and is evaluated with eval.py's code, in a child process
(`cla_jax.cli.sweep_worker`, which calls `cla_jax.sweep_worker`). After every finished run, DIR/results.csv,
results.jsonl, results.md, pareto.png and lr_sweep.png are rewritten. Rerunning skips finished runs, resumes
interrupted ones from their checkpoints and retries failed ones. See docs/sweep.md.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import ml_collections

from cla_jax import config_lib, sweep_report
from cla_jax.errors import UserError
from cla_jax.sweep_worker import RESULT_FILE, RUN_FILE

LOG_FILE = "sweep.log"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: a config (file[:row]) plus dotted-field overrides."""

  row: str  # what plots and tables group by, e.g. "H64-MQA"
  config: str  # e.g. "configs/default.py" or "configs/paper_1b.py:H64-MQA"
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"train.lr": 1e-3}
  seed: int = 0  # train.seed (parameter init); the data order stays the same across a sweep, as in the paper
  name: str = ""  # DIR/<name>; default "<row>_lr<lr>_s<seed>"


def grid(row: str, config: str, overrides: dict[str, Any], lrs: list[float], seeds: int) -> list[Run]:
  """Runs of one row at each learning rate and seeds 0..seeds-1."""
  return [Run(row, config, {**overrides, "train.lr": lr}, seed) for lr in lrs for seed in range(seeds)]


def family(num_heads: int, num_kv_heads: int, pattern: str) -> str:
  """Plot colour group: MQA / GQA / MHA, plus '+CLA2' etc. when layers share KV.

  One KV head is MQA even with a single query head (the paper's H128-MQA-CLA2 at width 128).
  """
  attention = "MQA" if num_kv_heads == 1 else "MHA" if num_kv_heads == num_heads else "GQA"
  return attention if pattern == "none" else f"{attention}+{pattern.upper()}"


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  """Sets dotted `field` of a locked config; an unknown field or a wrong type is a UserError."""
  *sections, key = field.split(".")
  node = config
  try:
    for section in sections:
      node = node[section]
    if key not in node:
      raise KeyError(key)
    with config.unlocked():
      node[key] = value
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(f"bad override {field}={value!r}: {e}; fields are written like 'train.lr'.") from None


def _import_sweep_file(path: pathlib.Path) -> Any:
  """The sweep file as a module; a file Python cannot run is one UserError naming the file and line."""
  module_spec = importlib.util.spec_from_file_location(f"cla_sweep_{path.stem}", path)
  if module_spec is None or module_spec.loader is None:
    raise UserError(f"sweep file {path} is not a Python file; e.g. configs/sweeps/tiny_pareto.py.")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"sweep file {path} line {e.lineno}: {e.msg}; fix the file and rerun.") from None
  except Exception as e:  # pylint: disable=broad-except  (user code: any error is the file's, not ours)
    raise UserError(f"sweep file {path} failed to load: {type(e).__name__}: {e}; fix the file and rerun.") from None
  return module


def _call_get_runs(path: pathlib.Path, get_runs: Any, seeds: int | None) -> list[Run]:
  """`get_runs()` (or `get_runs(seeds=)`) checked to give a list of Run; its own errors become one line."""
  try:
    runs = get_runs() if seeds is None else get_runs(seeds=seeds)
  except Exception as e:  # pylint: disable=broad-except  (user code)
    raise UserError(f"get_runs() of sweep file {path} raised {type(e).__name__}: {e}; fix the file.") from None
  if isinstance(runs, (str, bytes)) or not isinstance(runs, Iterable):
    raise UserError(
        f"get_runs() of sweep file {path} returned {type(runs).__name__} {runs!r:.60}; it must return a list of "
        "cla_jax.sweep.Run."
    )
  runs = list(runs)
  # By fields, not isinstance: a sweep file may hold another copy of Run (e.g. one run as __main__).
  bad = [r for r in runs if not (dataclasses.is_dataclass(r) and hasattr(r, "name") and hasattr(r, "config"))]
  if bad:
    raise UserError(
        f"get_runs() of sweep file {path} returned {type(bad[0]).__name__} {bad[0]!r:.60} among its runs; each "
        "must be a cla_jax.sweep.Run."
    )
  return runs


def load_sweep(spec: str, seeds: int | None) -> list[Run]:
  """The runs of a sweep file (`path`, relative paths also against the repo root)."""
  path = pathlib.Path(config_lib.resolve(spec))
  if not path.exists():
    raise UserError(f"sweep file {spec!r} not found; e.g. configs/sweeps/tiny_pareto.py.")
  module = _import_sweep_file(path)
  if not callable(getattr(module, "get_runs", None)):
    raise UserError(f"sweep file {path} has no get_runs() function returning a list of cla_jax.sweep.Run.")
  if seeds is not None and seeds < 1:
    raise UserError(f"--seeds must be a positive integer, got {seeds}.")
  runs = _call_get_runs(path, module.get_runs, seeds)
  runs = [dataclasses.replace(r, name=r.name or default_name(r)) for r in runs]
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"sweep {path} names several runs {duplicates}; give each run a distinct name.")
  return runs


def default_name(run: Run) -> str:
  lr = run.overrides.get("train.lr")
  name = run.row + (f"_lr{lr:g}" if lr is not None else "") + f"_s{run.seed}"
  return re.sub(r"[^\w.+-]", "_", name)


def resolve(run: Run, global_overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run's full config: its config file, its overrides, the command line's, and its seed."""
  try:
    config = config_lib.load(run.config)
  except Exception as e:  # a config file's own error (e.g. an unknown paper row), as one line
    raise UserError(f"config {run.config!r}: {e}") from None
  for field, value in {**run.overrides, **global_overrides, "train.seed": run.seed}.items():
    set_field(config, field, value)
  return config


@functools.cache
def _describe(cfg) -> dict[str, Any]:
  from cla_jax import describe  # pylint: disable=g-import-not-at-top  (imports jax)

  return describe.describe(cfg)


def describe_run(run: Run, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The static part of a result row: shape, KV bytes and params (from describe), lr, seed, steps."""
  m = config.model
  d = _describe(config_lib.model_config(config))  # once per model: the runs of a row share it
  return {
      "name": run.name,
      "row": run.row,
      "family": family(m.num_heads, m.num_kv_heads, m.pattern),
      "config": run.config,
      "d_head": m.head_dim,
      "num_heads": m.num_heads,
      "num_kv_heads": m.num_kv_heads,
      "num_layers": m.num_layers,
      "kv_layers": d["kv_layers"],
      "kv_bytes_per_token": d["kv_bytes_per_token"],
      "params": d["params"],
      "lr": config.train.lr,
      "seed": config.train.seed,
      "steps": config.train.steps,
      "tokens": config.train.steps * config.train.batch_size * config.train.seq_len,
  }


def last_error(log: str) -> str:
  """The one-line error of a failed worker's log: its `error:` line, else the exception line, else the tail."""
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  for line in reversed(lines):
    if line.startswith("error: "):
      return line[len("error: ") :]
  for line in reversed(lines):
    if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line):
      return line
  return lines[-1] if lines else "no output"


def device_env(parallel: int, slot: int) -> dict[str, str]:
  """The environment of the child in `slot`: its share of the GPUs when running several at once."""
  env = dict(os.environ)
  if parallel == 1:
    return env
  visible = env.get("CUDA_VISIBLE_DEVICES")
  gpus = visible.split(",") if visible else _nvidia_gpus()
  if gpus:
    share = len(gpus) // parallel
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * share : (slot + 1) * share])
  return env


def _nvidia_gpus() -> list[str]:
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def check_parallel(parallel: int) -> None:
  """Refuses a --parallel the hardware cannot split (TPU chips belong to one process; GPUs split evenly)."""
  if parallel < 1:
    raise UserError(f"--parallel must be a positive integer, got {parallel}.")
  if parallel == 1:
    return
  if pathlib.Path("/dev/accel0").exists() or os.environ.get("TPU_NAME"):
    raise UserError("--parallel>1 is not supported on TPU (one process owns the chips); use --parallel=1.")
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  gpus = visible.split(",") if visible else _nvidia_gpus()
  if gpus and len(gpus) % parallel:
    raise UserError(f"--parallel={parallel} cannot split {len(gpus)} GPUs evenly; use a divisor of {len(gpus)}.")


class Runner:
  """Trains the pending runs of a sweep directory, keeping its result rows and reports current."""

  def __init__(
      self, runs: list[Run], workdir: str, global_overrides: dict[str, Any], parallel: int = 1, title: str = ""
  ):
    self.workdir = pathlib.Path(workdir).expanduser().resolve()
    self.parallel = parallel
    self.title = title
    self.entries: list[tuple[Run, ml_collections.ConfigDict | None, dict[str, Any]]] = []
    for run in runs:
      try:
        config = resolve(run, global_overrides)
        row = describe_run(run, config)
      except (UserError, ValueError) as e:
        config, row = None, {
            "name": run.name,
            "row": run.row,
            "config": run.config,
            "status": "failed",
            "error": str(e),
        }
      self.entries.append((run, config, row))
    self._lock = threading.Lock()
    self._children: dict[str, subprocess.Popen] = {}
    self.stopping = False

  def results(self) -> list[dict[str, Any]]:
    """One row per run (sweep order): finished, failed or pending."""
    return [self._row(run, config, row) for run, config, row in self.entries]

  def _row(self, run: Run, config, row: dict[str, Any]) -> dict[str, Any]:
    if config is None:
      return row
    run_dir = self.workdir / run.name
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
      result = json.loads(result_path.read_text())
      if result.get("step") == config.train.steps:
        return {**row, "status": "done", "error": "", **result}
    failure = run_dir / "failed.json"
    if failure.exists():
      return {**row, "status": "failed", **json.loads(failure.read_text())}
    return {**row, "status": "pending", "error": ""}

  def pending(self) -> list[tuple[Run, ml_collections.ConfigDict]]:
    """Runs without a result at their configured steps (failed runs are retried)."""
    return [
        (run, config)
        for (run, config, _), r in zip(self.entries, self.results())
        if config is not None and r["status"] != "done"
    ]

  def write_reports(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    sweep_report.write_all(self.results(), self.workdir, self.title)

  def train(self, run: Run, config: ml_collections.ConfigDict, slot: int) -> bool:
    """Trains and evaluates one run in a child process; records a failure; True when it finished."""
    run_dir = self.workdir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    (run_dir / RUN_FILE).write_text(
        json.dumps({"name": run.name, "row": run.row, "config": config.to_dict()}, indent=2) + "\n"
    )
    env = device_env(self.parallel, slot)
    # Runs of one row at other seeds compile the same programs: share them through the persistent cache.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.workdir / ".jax_cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(config_lib.REPO_ROOT), env.get("PYTHONPATH")) if p)
    start = time.time()
    with open(run_dir / LOG_FILE, "a") as log:
      log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep worker start\n")
      log.flush()
      with self._lock:
        if self.stopping:
          return False
        child = subprocess.Popen(
            [sys.executable, "-m", "cla_jax.cli.sweep_worker", f"--run_file={run_dir / RUN_FILE}"],
            cwd=config_lib.REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._children[run.name] = child
      code = child.wait()
    with self._lock:
      del self._children[run.name]
      if self.stopping:
        return False  # interrupted by the user: resumed on the next sweep, not a failure
      if code == 0 and (run_dir / RESULT_FILE).exists():
        result = json.loads((run_dir / RESULT_FILE).read_text())
        result["wall_s"] = round(time.time() - start, 1)
        (run_dir / RESULT_FILE).write_text(json.dumps(result) + "\n")
        ok = True
      else:
        error = last_error((run_dir / LOG_FILE).read_text()) if code >= 0 else f"killed by signal {-code}"
        (run_dir / "failed.json").write_text(json.dumps({"error": error, "wall_s": round(time.time() - start, 1)}))
        ok = False
      self.write_reports()
    return ok

  def stop(self, signum, frame) -> None:  # pylint: disable=unused-argument
    """SIGINT/SIGTERM: children save a checkpoint and exit; the sweep resumes them when rerun."""
    with self._lock:
      self.stopping = True
      for child in self._children.values():
        child.send_signal(signal.SIGTERM)
    print("stopping: running workers save a checkpoint and exit; rerun the same command to resume.", flush=True)

  def run(self, log=print) -> list[dict[str, Any]]:
    """Trains every pending run, `parallel` at a time; returns the final result rows."""
    todo = self.pending()
    self.write_reports()
    log(
        f"{len(self.entries)} runs, {len(self.entries) - len(todo)} finished or invalid, {len(todo)} to train "
        f"in {self.workdir} ({self.parallel} at a time)"
    )
    slots = list(range(self.parallel))
    slots_lock = threading.Lock()
    started = time.time()
    done_count = [0]

    def work(item):
      run, config = item
      with slots_lock:
        slot = slots.pop()
      try:
        if self.stopping:
          return
        log(f"start {run.name}")
        t0 = time.time()
        ok = self.train(run, config, slot)
        if self.stopping:
          return
        done_count[0] += 1
        rate = (time.time() - started) / done_count[0] / self.parallel
        failure = self.workdir / run.name / "failed.json"
        status = "done" if ok else "FAILED: " + json.loads(failure.read_text())["error"]
        log(
            f"{status} {run.name} in {time.time() - t0:.0f}s ({done_count[0]}/{len(todo)}; about "
            f"{rate * (len(todo) - done_count[0]) / 60:.0f} min left)"
        )
      finally:
        with slots_lock:
          slots.append(slot)

    previous = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
        futures = [pool.submit(work, item) for item in todo]
        while not all(f.done() for f in futures):
          concurrent.futures.wait(futures, timeout=1.0)  # short waits keep the main thread free for signals
        for f in futures:
          f.result()
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    results = self.results()
    self.write_reports()
    return results


def format_dry_run(runner: Runner) -> str:
  """One line per run: name, row, overrides, KV bytes/token, params (or its error)."""
  width = max([len(r.name) for r, _, _ in runner.entries] + [4])
  row_width = max([len(r.row) for r, _, _ in runner.entries] + [3])
  lines = [f"{'name':<{width}} {'row':<{row_width}} {'KV B/tok':>9} {'params':>14}  config and overrides"]
  for run, config, row in runner.entries:
    if config is None:
      lines.append(f"{run.name:<{width}} {run.row:<{row_width}} {'INVALID':>9} {'':>14}  {row['error']}")
    else:
      overrides = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in run.overrides.items())
      lines.append(
          f"{run.name:<{width}} {run.row:<{row_width}} {row['kv_bytes_per_token']:>9} {row['params']:>14,}  "
          f"{run.config} seed={run.seed} {overrides}"
      )
  return "\n".join(lines)
