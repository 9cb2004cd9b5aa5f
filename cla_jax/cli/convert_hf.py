"""`cla-convert-hf`: a Hugging Face `LlamaForCausalLM` checkpoint as a CLA workdir (cla_jax.convert_hf).

cla-convert-hf --hf_dir=DIR --workdir=OUT [--pattern=cla2] [--kv_init=mean] [--config.train.lr=3e-4 ...]
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, convert_hf
from cla_jax import kv_init as kv_init_lib
from cla_jax import workdir as workdir_lib


def define_flags() -> None:
  """The CLI flags; defined on demand so importing this module as a library adds no global flags."""
  flags.DEFINE_string("hf_dir", None, "Hugging Face LlamaForCausalLM directory (config.json + *.safetensors).")
  flags.DEFINE_string("workdir", None, "Output workdir (new or empty).")
  flags.DEFINE_string(
      "pattern",
      "none",
      "KV sharing pattern of the converted model, e.g. none, cla2, keep_ends, "
      "'1,2,1'; 'none' keeps the original function exactly.",
  )
  flags.DEFINE_enum(
      "rope_layout",
      "half",
      convert_hf.ROPE_LAYOUTS,
      "Q/K RoPE layout of the checkpoint: 'half' for Hugging " "Face exports, 'interleaved' for Meta-layout weights.",
  )
  flags.DEFINE_string(
      "kv_init",
      "first",
      "How a shared group's K/V block is initialised: first (its first layer's), mean (the mean of its layers' "
      "projections, norm gains folded in) or lsq (least-squares fit of the layers' K/V on a calibration batch).",
  )
  flags.DEFINE_integer(
      "calib_sequences",
      8,
      "Training sequences (of train.seq_len tokens, from --config's data) that 'lsq' fits on and the report's "
      "K/V errors are measured on; 0: no calibration (then no errors in the report).",
  )
  config_flags.DEFINE_config_file(
      "config",
      config_lib.DEFAULT_CONFIG,
      "Base config for the workdir (training "
      "and eval settings; the model architecture comes from the checkpoint), e.g. --config.train.lr=3e-4.",
  )


def main(argv: list[str]) -> None:
  """Converts `--hf_dir` into `--workdir`; prints the report."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --hf_dir=DIR --workdir=OUT.")
  args = flags.FLAGS
  if not args.hf_dir or not args.workdir:
    raise cli.UserError("--hf_dir and --workdir are required, e.g. --hf_dir=llama-hf --workdir=runs/llama_cla2.")
  if args.calib_sequences < 0:
    raise cli.UserError(f"--calib_sequences={args.calib_sequences} must be >= 0 (0: no calibration batch).")
  if args.kv_init not in kv_init_lib.KV_INITS:
    raise cli.UserError(f"--kv_init={args.kv_init!r} is not one of {kv_init_lib.KV_INITS}; see docs/convert_hf.md.")
  tokens = None
  if args.calib_sequences and args.pattern != "none":
    convert_hf.read_hf_config(args.hf_dir)  # a missing checkpoint is named before any data is prepared
    tokens = convert_hf.calibration_tokens(args.hf_dir, args.config, args.calib_sequences)
  report = convert_hf.convert(
      args.hf_dir,
      args.workdir,
      pattern=args.pattern,
      config=args.config,
      rope_layout=args.rope_layout,
      kv_init=args.kv_init,
      calib_tokens=tokens,
  )
  for line in convert_hf.describe_report(report):
    print(line)
  print(f"wrote {args.workdir} (report: {pathlib.Path(args.workdir) / workdir_lib.CONVERT_REPORT_FILE})")


def entry() -> None:
  """Console-script entry point (`cla-convert-hf`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
