"""`cla-export-hf`: a cla_jax workdir as a Hugging Face model directory (cla_jax.export_hf).

cla-export-hf --workdir=DIR --out=HF_DIR [--step=N] [--dtype=bfloat16|float32] [--overwrite]
"""

from absl import flags

from cla_jax import cli, export_hf


def define_flags() -> None:
  """The CLI flags; defined on demand so importing this module as a library adds no global flags."""
  flags.DEFINE_string("workdir", None, "cla_jax workdir to export (trained or converted).")
  flags.DEFINE_string("out", None, "Output Hugging Face model directory (new or empty, unless --overwrite).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
  flags.DEFINE_enum("dtype", "bfloat16", export_hf.DTYPES, "dtype of the exported weights.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")


def main(argv: list[str]) -> None:
  """Exports `--workdir` to `--out`; prints a summary."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --workdir=DIR --out=HF_DIR.")
  args = flags.FLAGS
  if not args.workdir or not args.out:
    raise cli.UserError("--workdir and --out are required, e.g. --workdir=runs/default --out=runs/default-hf.")
  summary = export_hf.export(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
  for line in export_hf.describe_export(summary):
    print(line)


def entry() -> None:
  """Console-script entry point (`cla-export-hf`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
