"""One sweep run: train to `train.steps`, then evaluate; `cla_jax.sweep` starts each in its own process with

    python -m cla_jax.cli.sweep_worker --run_file=DIR/<run>/sweep_run.json

The run file holds the resolved config; the workdir is the run file's directory. On success the
validation metrics go to `result.json` next to it; a user error ends with one `error: ...` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from cla_jax.errors import UserError

RUN_FILE = "sweep_run.json"
RESULT_FILE = "result.json"


def train_and_evaluate(run_file: str | os.PathLike) -> None:
  """Trains the run `run_file` describes in its directory, evaluates it and writes result.json beside it."""
  # jax, orbax and the data pipeline: imported here so that the runner, which imports this module's file
  # names, stays light.
  from cla_jax import config_lib, evaluate, trainer  # pylint: disable=g-import-not-at-top
  from cla_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  start = time.time()
  run_file = pathlib.Path(run_file)
  workdir = str(run_file.parent)
  config = config_lib.from_json(json.dumps(json.loads(run_file.read_text())["config"]))
  trainer.run(config, workdir)
  step = workdir_lib.latest_step(workdir)
  if step != config.train.steps:
    # SIGTERM makes the trainer save and return early: an interrupted run is resumed, not evaluated.
    raise UserError(
        f"training stopped at checkpoint step {step} of {config.train.steps} (interrupted); "
        f"rerun the sweep to resume it."
    )
  metrics = evaluate.run(workdir, progress=False)
  result = {
      "val_loss": metrics["loss"],
      "perplexity": metrics["perplexity"],
      "eval_tokens": metrics["tokens"],
      "step": metrics["step"],
      "worker_wall_s": time.time() - start,
  }
  tmp = run_file.parent / (RESULT_FILE + ".tmp")
  tmp.write_text(json.dumps(result) + "\n")
  os.replace(tmp, run_file.parent / RESULT_FILE)  # atomic: a result file is always complete
