"""`cla-sweep`: trains a sweep of runs, evaluates them, and keeps its reports current (cla_jax.sweep).

cla-sweep --sweep=configs/sweeps/tiny_pareto.py --workdir=DIR [--parallel=N] [--only=REGEX]
    [--seeds=N] [--dry_run] [--config.train.steps=600 ...]
"""

import pathlib
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, paths, sweep


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  flags.DEFINE_string("sweep", None, "Sweep file, e.g. configs/sweeps/tiny_pareto.py.", required=True)
  flags.DEFINE_string("workdir", None, "Sweep directory: DIR/<run>/ per run, results and plots in DIR.", required=True)
  flags.DEFINE_integer("parallel", 1, "Runs trained at once, as separate processes (GPUs are split evenly).")
  flags.DEFINE_string("only", None, "Regular expression: train/list only runs whose name it matches.")
  flags.DEFINE_integer("seeds", None, "Seeds per row and learning rate (default: the sweep file's).")
  flags.DEFINE_bool("dry_run", False, "List the runs (name, row, KV bytes, params, overrides) and exit.")
  cli.define_config_dict(
      "config",
      config_lib.load(config_lib.DEFAULT_CONFIG),
      "Only as --config.<field>=value overrides applied to every run, e.g. --config.train.steps=600.",
  )


def main(argv: list[str]) -> None:
  """Lists (--dry_run) or trains, evaluates and reports the runs of `--sweep` in `--workdir`."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  f = flags.FLAGS
  sweep.check_parallel(f.parallel)
  paths.check_output_dir(f.workdir, "--workdir")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")  # describe() here needs shapes only; the workers own the accelerators
  runs = sweep.load_sweep(f.sweep, f.seeds)
  if f.only:
    try:
      pattern = re.compile(f.only)
    except re.error as e:
      raise cli.UserError(f"--only={f.only!r} is not a regular expression: {e}.") from None
    runs = [r for r in runs if pattern.search(r.name)]
    if not runs:
      raise cli.UserError(f"--only={f.only!r} matches no run of {f.sweep}; --dry_run lists their names.")
  overrides = dict(config_flags.get_override_values(f["config"]))
  runner = sweep.Runner(runs, f.workdir, overrides, f.parallel, title=pathlib.Path(f.sweep).stem)
  if f.dry_run:
    print(sweep.format_dry_run(runner), flush=True)
    return
  results = runner.run(log=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True))
  counts = {s: sum(r["status"] == s for r in results) for s in ("done", "failed", "pending")}
  print(
      f"sweep {'stopped' if runner.stopping else 'finished'}: {counts['done']} done, {counts['failed']} failed, "
      f"{counts['pending']} pending; reports in {runner.workdir}",
      flush=True,
  )
  if runner.stopping:
    sys.exit(1)


def entry() -> None:
  """Console-script entry point (`cla-sweep`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
