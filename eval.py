"""Evaluates a training workdir: `python eval.py --workdir=runs/default [--step=N] [--text_file=wiki.test.raw]`.

The same command as `cla-eval` (cla_jax/cli/eval.py, flags and all); prints a table, then one JSON line.
See docs/eval.md.
"""

from cla_jax.cli import eval as eval_command

if __name__ == "__main__":
  eval_command.entry()
