"""`cla-python-docs`: builds the default corpus (the Python documentation's reST sources) as a TFDS dataset.

cla-python-docs [--data_dir=~/.cache/cla_jax]          (scripts/get_python_docs.sh fetches the sources first)
"""

from absl import flags

from cla_jax import cli
from cla_jax.data import python_docs


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  flags.DEFINE_string("data_dir", "~/.cache/cla_jax", "TFDS data dir (same as config.data.data_dir).")


def main(argv: list[str]) -> None:
  """Builds the dataset in `--data_dir`; prints its splits and checksum."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  b = python_docs.prepare(flags.FLAGS.data_dir)
  splits = {name: info.num_examples for name, info in b.info.splits.items()}
  print(f"{python_docs.NAME} ready in {b.data_dir}: {splits} files, checksum {b.info.metadata['checksum'][:16]}")


def entry() -> None:
  """Console-script entry point (`cla-python-docs`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
