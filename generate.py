"""Generates text from a workdir's model with the KV cache: `python generate.py --workdir=DIR --prompt="..."`.

The same command as `cla-generate` (cla_jax/cli/generate.py, flags and all). See the README's "Generate" section.
"""

from cla_jax.cli import generate as generate_command

if __name__ == "__main__":
  generate_command.entry()
