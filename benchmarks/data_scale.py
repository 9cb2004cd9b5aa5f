"""Data at scale: prepare throughput with 1 vs 2 workers, trainer start-up and peak RSS for a prepared corpus
of ~1M tokens vs one `--scale` times larger, and input throughput against the train step.

  python benchmarks/data_scale.py [--small_tokens=1000000] [--scale=30] [--root=/tmp/cla_data_scale]
      [--measure=prepare,startup,throughput] [--prepare_repeats=1]

Generates a corpus of synthetic English-like sentences under --root (deleted at the end), trains one
sentencepiece tokenizer on it, prepares the large corpus with `python -m cla_jax.cli.prepare` at
--num_workers=1 and 2 (checking both give the same bytes), then runs `train.py` for one step on each
prepared corpus (`--config.data.prepared_dir`), recording wall time from process start to exit (start-up,
compilation, one step, one checkpoint) and the child's peak RSS (wait4). Prints one JSON line per measurement
and a summary line of ratios; on a shared machine only the ratios mean anything.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from cla_jax import cli, config_lib  # noqa: E402
from cla_jax.data import tokenizer as tokenizer_lib  # noqa: E402

_SMALL = flags.DEFINE_integer("small_tokens", 1_000_000, "Approximate tokens of the small corpus.")
_SCALE = flags.DEFINE_integer("scale", 30, "How many times larger the large corpus is.")
_ROOT = flags.DEFINE_string("root", "/tmp/cla_data_scale", "Scratch directory (deleted at the end).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the scratch directory.")
_MEASURE = flags.DEFINE_list("measure", ["prepare", "startup", "throughput"], "What to measure.")
_REPEATS = flags.DEFINE_integer("prepare_repeats", 1, "Alternating 1- and 2-worker prepare runs (best of each).")

_WORDS = (
    "the a an of to in is and for with that this module function class object value return list dict "
    "string file path error exception import data type call method default argument python interpreter "
    "thread lock socket buffer bytes encoding iterator generator context manager when which may be can "
    "not if else raise see also note example version changed added"
).split()
_WORDS_PER_DOC = 2000
_SMALL_CONFIG = [
    "--config.model.num_layers=2",
    "--config.train.steps=1",
    "--config.train.eval_every=0",
    "--config.train.batch_size=16",
    "--config.mesh.num_devices=1",
    "--config.train.peak_flops_per_device=1e10",
]


def write_corpus(directory: pathlib.Path, num_words: int, seed: int) -> None:
  """.txt files of random sentences, _WORDS_PER_DOC words each."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = np.array(_WORDS)
  for i in range(max(1, num_words // _WORDS_PER_DOC)):
    ids = rng.integers(0, len(words), _WORDS_PER_DOC)
    lengths = rng.integers(5, 15, _WORDS_PER_DOC // 5)
    cuts = np.cumsum(lengths)
    cuts = cuts[cuts < _WORDS_PER_DOC]
    sentences = [" ".join(s).capitalize() + "." for s in np.split(words[ids], cuts)]
    (directory / f"doc{i:06d}.txt").write_text(" ".join(sentences) + "\n")


def data_flags(root: pathlib.Path, corpus: str, tokenizer: str) -> list[str]:
  """Config overrides that read `root/corpus/*.txt` with the benchmark's tokenizer."""
  return [
      "--config.data.source=text",
      f"--config.data.text_glob={root / corpus}/*.txt",
      f"--config.data.cache_dir={root / 'cache'}",
      f"--config.data.tokenizer={tokenizer}",
  ]


def timed_child(cmd: list[str]) -> tuple[float, float, str, float]:
  """(wall s, peak RSS MiB, stdout, CPU s) of a child, from wait4: its own peak, not the max over all children.

  The CPU time includes the child's worker processes (waited for by the child).
  """
  start = time.perf_counter()
  with tempfile.TemporaryFile() as stderr:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr, cwd=config_lib.REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
      stderr.seek(0)
      raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{stderr.read().decode()[-3000:]}")
  return wall, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> None:
  del argv
  root = pathlib.Path(_ROOT.value)
  shutil.rmtree(root, ignore_errors=True)
  try:
    _measure(root)
  finally:
    if not _KEEP.value:
      shutil.rmtree(root, ignore_errors=True)


def _measure(root: pathlib.Path) -> None:
  py = sys.executable
  start = time.perf_counter()
  write_corpus(root / "small", _SMALL.value, seed=0)
  write_corpus(root / "large", _SMALL.value * _SCALE.value, seed=1)
  print(json.dumps({"corpus_written_s": round(time.perf_counter() - start, 1)}), flush=True)

  # One tokenizer for every run, trained once (tokenizer training is not what is measured).
  config = config_lib.load(config_lib.DEFAULT_CONFIG)
  config.data.update(source="text", text_glob=str(root / "small" / "*.txt"), cache_dir=str(root / "cache"))
  tokenizer = str(tokenizer_lib.get_tokenizer(config).save(root / "tokenizer"))
  prepare = [py, "-m", "cla_jax.cli.prepare", "--config=configs/default.py"]

  def prepare_large(workers: int, output: pathlib.Path) -> tuple[float, float, int]:
    shutil.rmtree(output, ignore_errors=True)
    wall, _, out, cpu = timed_child(
        prepare + data_flags(root, "large", tokenizer) + [f"--output={output}", f"--num_workers={workers}"]
    )
    summary = json.loads(out)
    return wall, cpu, summary["train"]["tokens"] + summary["validation"]["tokens"]

  summary = {"summary": "ratios (machine shared with other jobs: absolute times are noisy)"}
  if "prepare" in _MEASURE.value:
    best = {}
    for _ in range(_REPEATS.value):  # alternate, so both see the same mix of load; keep the best of each
      for workers in (1, 2):
        wall, cpu, tokens = prepare_large(workers, root / f"prepared_w{workers}")
        # Cores obtained (CPU s / wall s): on a shared machine the speed-up cannot exceed their ratio.
        print(
            json.dumps(
                {
                    "prepare_workers": workers,
                    "tokens": tokens,
                    "wall_s": round(wall, 1),
                    "tokens_per_s": round(tokens / wall),
                    "cpu_s": round(cpu, 1),
                    "cores_obtained": round(cpu / wall, 2),
                    "tokens_per_cpu_s": round(tokens / cpu),
                }
            ),
            flush=True,
        )
        if workers not in best or wall < best[workers][0]:
          best[workers] = (wall, cpu)
    for f in sorted((root / "prepared_w1" / "train").iterdir()):
      assert f.read_bytes() == (root / "prepared_w2" / "train" / f.name).read_bytes(), f"{f.name} differs"
    summary["prepare_2_vs_1_workers"] = round(best[1][0] / best[2][0], 2)
    summary["prepare_2_vs_1_cores_obtained"] = round((best[2][1] / best[2][0]) / (best[1][1] / best[1][0]), 2)
  large = root / "prepared_w2"
  if not (large / "train" / "index.json").exists():
    prepare_large(os.cpu_count() or 1, large)

  if "startup" in _MEASURE.value:
    timed_child(prepare + data_flags(root, "small", tokenizer) + [f"--output={root / 'prepared_small'}"])
    startup = {}
    for name, prepared in (("small", root / "prepared_small"), ("large", large)):
      # No text glob: once prepared_dir is set, training reads only the prepared shards (and their tokenizer).
      cmd = [
          py,
          "train.py",
          "--config=configs/default.py",
          f"--workdir={root / 'work'}",
          f"--config.data.prepared_dir={prepared}",
          *_SMALL_CONFIG,
      ]
      shutil.rmtree(root / "work", ignore_errors=True)
      timed_child(cmd)  # warm the page cache and imports equally for both
      shutil.rmtree(root / "work", ignore_errors=True)
      wall, rss, _, _ = timed_child(cmd)
      startup[name] = (wall, rss)
      index = json.loads((prepared / "train" / "index.json").read_text())
      print(
          json.dumps(
              {
                  "train_startup": name,
                  "train_tokens": index["num_tokens"],
                  "wall_s": round(wall, 2),
                  "peak_rss_mib": round(rss),
              }
          ),
          flush=True,
      )
      startup[name] += (index["num_tokens"],)
    summary["corpus_ratio"] = round(startup["large"][2] / startup["small"][2], 1)
    summary["startup_large_vs_small"] = round(startup["large"][0] / startup["small"][0], 2)
    summary["peak_rss_large_vs_small"] = round(startup["large"][1] / startup["small"][1], 2)

  if "throughput" in _MEASURE.value:
    _, _, out, _ = timed_child(
        [
            py,
            "benchmarks/input_throughput.py",
            "--config=configs/default.py",
            f"--config.data.prepared_dir={large}",
            "--config.mesh.num_devices=1",
        ]
    )
    throughput = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(throughput), flush=True)
    summary["input_vs_train_step"] = throughput["headroom"]
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.start(main)
