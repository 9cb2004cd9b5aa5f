"""Generates text from a workdir's model with the KV cache: `python generate.py --workdir=DIR --prompt="..."`.

The same command as `cla-generate` (cla_jax/generate_cli.py, flags and all). See the README's "Generate" section.
"""

from cla_jax import generate_cli

if __name__ == "__main__":
  generate_cli.run()
