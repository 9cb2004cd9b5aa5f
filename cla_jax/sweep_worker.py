"""One sweep run in its own process: train to `train.steps`, then evaluate (started by `cla_jax.sweep`).

    python -m cla_jax.sweep_worker --run_file=DIR/<run>/sweep_run.json

The run file holds the resolved config; the workdir is the run file's directory. On success the
validation metrics go to `result.json` next to it; a user error ends with one `error: ...` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from absl import flags

from cla_jax import cli

RUN_FILE = "sweep_run.json"
RESULT_FILE = "result.json"


def main(argv: list[str]) -> None:
  del argv
  from cla_jax import checkpoint, config_lib, evaluate, trainer  # pylint: disable=g-import-not-at-top

  start = time.time()
  run_file = pathlib.Path(flags.FLAGS.run_file)
  workdir = str(run_file.parent)
  config = config_lib.from_json(json.dumps(json.loads(run_file.read_text())["config"]))
  trainer.run(config, workdir)
  step = checkpoint.latest_step(workdir)
  if step != config.train.steps:
    # SIGTERM makes the trainer save and return early: an interrupted run is resumed, not evaluated.
    raise cli.UserError(
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


if __name__ == "__main__":
  flags.DEFINE_string("run_file", None, f"The {RUN_FILE} the sweep runner wrote.", required=True)
  cli.run(main)
