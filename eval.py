"""Evaluates a training workdir: `python eval.py --workdir=runs/default [--step=N] [--text_file=wiki.test.raw]`.

The same command as `cla-eval` (cla_jax/eval_cli.py, flags and all); prints a table, then one JSON line.
See docs/eval.md.
"""

from cla_jax import eval_cli

if __name__ == "__main__":
  eval_cli.run()
