"""The measured uptraining recipe (docs/convert_hf.md): turn a trained model into CLA2 and recover it.

    python scripts/uptrain_recipe.py --out=runs/uptrain            # the full table (about an hour on 2 cores)
    python scripts/uptrain_recipe.py --out=runs/uptrain_quick --quick   # the same pipeline in minutes

Stages (each skipped when its output exists, so rerunning the command resumes; a killed training run
resumes from its newest checkpoint):
  1. teacher: configs/default.py with model.pattern=none for --teacher_steps steps;
  2. export it to Hugging Face (fp32, so the round trip is exact);
  3. convert it back with --pattern=cla2 under each --kv_init;
  4. recover each conversion with the LM loss only and with distillation from the teacher, checkpoints at
     every --recovery_steps count (of one run of the largest count: one cosine schedule);
  5. CLA2 from scratch for teacher + recovery steps (checkpoints at teacher + each count);
  6. validation perplexity (eval.py's split, --eval_tokens tokens) of every checkpoint above.
Writes OUT/uptrain_table.md and OUT/uptrain_table.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
INITS = ("first", "mean", "lsq")
MODES = ("lm", "distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line settings; --quick shrinks every count so that the whole pipeline runs in minutes."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.error = lambda message: sys.exit(f"error: {message}")  # one line, like the cla_jax CLIs
  p.add_argument("--out", required=True, help="Output directory (reused: finished stages are skipped).")
  p.add_argument("--quick", action="store_true", help="Tiny counts: checks the pipeline end to end in minutes.")
  p.add_argument("--teacher_steps", type=int, default=1200)
  p.add_argument("--recovery_steps", default="50,100,200,400", help="Comma-separated step counts to report.")
  p.add_argument("--recovery_lr", type=float, default=1e-3, help="Peak learning rate of the recovery runs.")
  p.add_argument("--distill_weight", type=float, default=0.5)
  p.add_argument("--distill_temperature", type=float, default=1.0)
  p.add_argument("--inits", default=",".join(INITS), help=f"K/V initialisations to compare, from {INITS}.")
  p.add_argument("--eval_tokens", type=int, default=262144, help="Validation tokens per perplexity.")
  args = p.parse_args(argv)
  if args.quick:
    args.teacher_steps, args.recovery_steps, args.eval_tokens = 40, "5,10,20,40", 16384
  try:
    args.recovery = sorted({int(s) for s in args.recovery_steps.split(",")})
  except ValueError:
    p.error(f"--recovery_steps={args.recovery_steps!r} must be comma-separated integers, e.g. 50,100,200,400.")
  args.inits = [s for s in args.inits.split(",") if s]
  bad = [s for s in args.inits if s not in INITS]
  if bad or not args.inits:
    p.error(f"--inits={','.join(args.inits)!r}: each must be one of {INITS}.")
  if args.teacher_steps < 1 or args.recovery[0] < 1 or args.eval_tokens < 1:
    p.error("--teacher_steps, --recovery_steps and --eval_tokens must be positive.")
  if not 0 <= args.distill_weight <= 1 or not args.distill_temperature > 0:
    p.error("--distill_weight must be in [0, 1] and --distill_temperature > 0.")
  return args


def _run(cmd: list[str], log: pathlib.Path) -> None:
  """Runs a stage's command, its output appended to `log`; stops the recipe with the log's tail on failure."""
  print(f"$ {' '.join(cmd)}", flush=True)
  with open(log, "ab") as f:
    result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    tail = log.read_text(errors="replace").splitlines()[-5:]
    sys.exit(f"error: stage failed (exit {result.returncode}); see {log}:\n" + "\n".join(tail))


def _has_step(workdir: pathlib.Path, step: int) -> bool:
  return (workdir / "checkpoints" / str(step)).is_dir()


def train(workdir: pathlib.Path, steps: int, every: int, overrides: list[str]) -> None:
  """train.py on `workdir` up to `steps` (resuming), keeping a checkpoint every `every` steps."""
  if _has_step(workdir, steps):
    return
  cmd = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}"]
  cmd += [f"--config.train.steps={steps}", f"--config.checkpoint.every_steps={every}", "--config.checkpoint.keep=1000"]
  cmd += ["--config.train.eval_every=0", *overrides]
  _run(cmd, workdir.parent / f"{workdir.name}.log")


def export(teacher: pathlib.Path, hf_dir: pathlib.Path) -> None:
  """The teacher as a Hugging Face directory (fp32)."""
  if (hf_dir / "config.json").is_file() and list(hf_dir.glob("*.safetensors")):
    return
  cmd = [sys.executable, "-m", "cla_jax.cli.export_hf", f"--workdir={teacher}", f"--out={hf_dir}", "--dtype=float32"]
  _run(cmd + ["--overwrite"], hf_dir.parent / "export.log")


def tokenizer_of(hf_dir: pathlib.Path) -> pathlib.Path:
  """The exported teacher's tokenizer file (the student must use exactly this one)."""
  found = [hf_dir / n for n in ("tokenizer.json", "tokenizer.model") if (hf_dir / n).is_file()]
  if not found:
    sys.exit(f"error: {hf_dir} has no tokenizer.json or tokenizer.model; re-export the teacher.")
  return found[0]


def convert(hf_dir: pathlib.Path, workdir: pathlib.Path, kv_init: str) -> None:
  """`convert_hf --pattern=cla2 --kv_init=...`; a conversion that died half way is redone."""
  if (workdir / "convert_report.json").is_file():
    return
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "cla_jax.cli.convert_hf", f"--hf_dir={hf_dir}", f"--workdir={workdir}", "--pattern=cla2"]
  cmd += [f"--kv_init={kv_init}", "--calib_sequences=16", f"--config.data.tokenizer={tokenizer_of(hf_dir)}"]
  _run(cmd, workdir.parent / f"{workdir.name}.log")


def recovery_dir(converted: pathlib.Path, workdir: pathlib.Path) -> None:
  """A copy of the converted workdir to train in (the conversion itself stays at step 0)."""
  if (workdir / "config.json").is_file():
    return
  tmp = workdir.with_name(workdir.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(converted, tmp, ignore=shutil.ignore_patterns("eval"))
  tmp.rename(workdir)


def perplexity(workdir: pathlib.Path, step: int, tokens: int) -> float:
  """Validation perplexity of checkpoint `step` (cached in the workdir's eval/ file, as eval.py writes it)."""
  cached = workdir / "eval" / f"validation_step{step}.json"
  if cached.is_file():
    result = json.loads(cached.read_text())
    if result.get("max_tokens_asked") == tokens:
      return float(result["perplexity"])
  from cla_jax import evaluate  # pylint: disable=g-import-not-at-top  (jax: only once something is evaluated)

  result = evaluate.run(str(workdir), step=step, max_tokens=tokens, progress=False, write=False)
  cached.parent.mkdir(parents=True, exist_ok=True)
  cached.write_text(json.dumps({**result, "max_tokens_asked": tokens}, indent=2) + "\n")
  print(f"  {workdir.name} step {step}: perplexity {result['perplexity']:.2f}", flush=True)
  return float(result["perplexity"])


def table(results: dict, args: argparse.Namespace) -> str:
  """The markdown table: one row per model, one column per recovery step count."""
  counts = args.recovery
  fmt = lambda x: "–" if x is None or not math.isfinite(x) else f"{x:.2f}"  # noqa: E731
  lines = [
      f"Validation perplexity ({args.eval_tokens:,} tokens of the default corpus' validation split). Teacher: "
      f"configs/default.py with model.pattern=none, {args.teacher_steps} steps: **{fmt(results['teacher'])}**. "
      f"Recovery: lr {args.recovery_lr}, one cosine schedule over {counts[-1]} steps; distillation weight "
      f"{args.distill_weight}, temperature {args.distill_temperature}.",
      "",
      "| model | after conversion | " + " | ".join(f"+{c} steps" for c in counts) + " |",
      "| --- | --- | " + " | ".join("---" for _ in counts) + " |",
      f"| CLA2 from scratch ({args.teacher_steps} + n steps) | – | "
      + " | ".join(fmt(results["scratch"][str(c)]) for c in counts)
      + " |",
  ]
  for init in args.inits:
    for mode in MODES:
      row = results["uptrained"][init]
      label = "LM loss" if mode == "lm" else "distillation"
      cells = " | ".join(fmt(row[mode][str(c)]) for c in counts)
      lines.append(f"| teacher -> CLA2, kv_init={init}, {label} | {fmt(row['converted'])} | {cells} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  """Runs (or resumes) every stage, then writes and prints the table."""
  args = parse_args(argv)
  out = pathlib.Path(args.out).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  counts, every = args.recovery, math.gcd(*args.recovery)

  teacher, hf_dir = out / "teacher", out / "teacher_hf"
  train(teacher, args.teacher_steps, args.teacher_steps, ["--config.model.pattern=none"])
  export(teacher, hf_dir)
  scratch = out / "cla2_scratch"
  train(scratch, args.teacher_steps + counts[-1], every, ["--config.model.pattern=cla2"])

  results = {
      "teacher": perplexity(teacher, args.teacher_steps, args.eval_tokens),
      "scratch": {str(c): perplexity(scratch, args.teacher_steps + c, args.eval_tokens) for c in counts},
      "uptrained": {},
  }
  for init in args.inits:
    converted = out / f"converted_{init}"
    convert(hf_dir, converted, init)
    row = {"converted": perplexity(converted, 0, args.eval_tokens)}
    for mode in MODES:
      run = out / f"recover_{init}_{mode}"
      recovery_dir(converted, run)
      overrides = [f"--config.data.tokenizer={tokenizer_of(hf_dir)}", f"--config.train.lr={args.recovery_lr}"]
      if mode == "distill":
        overrides += [
            f"--config.train.teacher={hf_dir}",
            f"--config.train.distill_weight={args.distill_weight}",
            f"--config.train.distill_temperature={args.distill_temperature}",
        ]
      train(run, counts[-1], every, overrides)
      row[mode] = {str(c): perplexity(run, c, args.eval_tokens) for c in counts}
    row["kv_relative_errors"] = json.loads((converted / "convert_report.json").read_text())["kv_relative_errors"]
    results["uptrained"][init] = row

  text = table(results, args)
  settings = {k: v for k, v in vars(args).items() if k != "out"}
  (out / "uptrain_table.md").write_text(text)
  (out / "uptrain_table.json").write_text(json.dumps({"settings": settings, **results}, indent=2) + "\n")
  print(text)
  print(f"wrote {out / 'uptrain_table.md'} and {out / 'uptrain_table.json'}")


if __name__ == "__main__":
  main()
