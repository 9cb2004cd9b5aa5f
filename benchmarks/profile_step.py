"""Where the train step's time goes: per-op times from the jax profiler, grouped by the model code that made them.

  python benchmarks/profile_step.py                                # default config, CPU
  python benchmarks/profile_step.py --config.model.pattern=none --config.model.remat=none --top=30

Runs a few steps under `jax.profiler.trace` (Perfetto JSON, no extra packages), sums each XLA op's
time over the runtime's worker threads, and joins op names with the compiled HLO's `op_name` metadata,
so a fusion is reported as the jax code it came from: its phase (forward, backward, optimizer) and the
last parts of its name scope (e.g. `bwd  kv/dot_general`, a K/V projection's backward); a second table sums
the same times by op kind (matmuls, the scan's dynamic slices / updates and fills, elementwise, ...).
Op time is summed over threads, so it can exceed the step's wall time on several cores; the shares are
what to read.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import step_setup  # benchmarks/step_setup.py, beside this script
from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Config file[:row].", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Profiled steps (after two warm-up steps).")
_TOP = flags.DEFINE_integer("top", 25, "Rows of the per-source table.")

# Name-scope parts that say where in the program an op sits, not what it does.
_PLUMBING = (
    "jit(step)",
    "transpose(",
    "jvp(",
    "while",
    "body",
    "closed_call",
    "segment_",
    "layer_",
    "checkpoint",
    "remat",
    "rematted_computation",
)


def source_of(op_name: str) -> str:
  """'bwd  btd,df->btf/dot_general' from an HLO op_name (phase, then the last two meaningful scopes)."""
  phase = "bwd" if "transpose(" in op_name else ("fwd" if "jvp(" in op_name else "opt")
  parts = [p for p in op_name.split("/") if p and not p.startswith(_PLUMBING)]
  return f"{phase}  {'/'.join(parts[-2:])}"


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, for every instruction that has one."""
  pattern = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"")
  sources = {}
  for line in hlo_text.splitlines():
    if m := pattern.match(line):
      sources.setdefault(m.group(1), m.group(2))
  return sources


def op_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> what it does (dot, dynamic-slice, fill, ...), from the ops of the computation it calls.

  The kind says what the time is spent on whatever model code the op came from, e.g. the scan's stacking of
  residuals (fills, dynamic-update-slices, dynamic-slices) against the matmuls.
  """
  ops_of, current = {}, None
  for line in hlo_text.splitlines():
    if (m := re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)) and line.rstrip().endswith("{"):
      current = ops_of.setdefault(m.group(1), set())
    elif current is not None and (m := re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", line)):
      current.add(m.group(1))
  kinds = {}
  for line in hlo_text.splitlines():
    if m := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line):
      called = re.search(r"calls=%([\w.\-]+)", line)
      kinds.setdefault(m.group(1), _kind(ops_of.get(called.group(1), set()) if called else {m.group(2)}))
  return kinds


def _kind(ops: set[str]) -> str:
  for op in ("dot", "dynamic-update-slice", "dynamic-slice", "scatter", "gather", "reduce"):
    if op in ops:
      return op
  if ops <= {"broadcast", "constant", "parameter"}:
    return "fill (broadcast)"
  if ops <= {"copy", "bitcast", "parameter", "transpose"}:
    return "copy / transpose"
  return "elementwise / other"


def op_times(trace_dir: str) -> collections.Counter:
  """Microseconds per op name, summed over the XLA runtime threads of a Perfetto trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {
      (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  times = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
      continue
    if e["name"].startswith("ThunkExecutor"):  # containers of the ops below, not ops
      continue
    times[e["name"]] += e["dur"]
  return times


def main(argv):
  del argv
  config = _CONFIG.value
  setup = step_setup.setup_step(config)
  cfg = setup.model_config
  b, t = config.train.batch_size, config.train.seq_len
  with jax.set_mesh(setup.mesh):
    hlo_text = setup.step.jitted.lower(setup.params, setup.opt_state, setup.batch).compile().as_text()
  sources, kinds = op_sources(hlo_text), op_kinds(hlo_text)
  jax.block_until_ready(setup.run(2))

  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(setup.run(_STEPS.value))
    wall_ms = 1e3 * (time.perf_counter() - start) / _STEPS.value
    times = op_times(trace_dir)

  by_source = collections.Counter()
  for name, us in times.items():
    by_source[source_of(sources[name]) if name in sources else f"---  {re.sub(r'[.0-9]+$', '', name)}"] += us
  total = sum(by_source.values())
  per_step = lambda us: us / _STEPS.value / 1e3  # noqa: E731
  print(
      f"{cfg.num_layers} layers, pattern={cfg.pattern}, remat={cfg.resolved_remat}, "
      f"attention={cfg.resolved_attention_impl}, scan={cfg.scan_layers}, "
      f"batch {b} x {t}; {_STEPS.value} steps, wall {wall_ms:.1f} ms/step (profiled), "
      f"op time {per_step(total):.1f} ms/step summed over threads"
  )
  phases = collections.Counter()
  for source, us in by_source.items():
    phases[source.split()[0]] += us
  print("by phase: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in phases.most_common()))
  print(f"{'ms/step':>8} {'share':>6}  source (phase, name scope)")
  for source, us in by_source.most_common(_TOP.value):
    print(f"{per_step(us):8.2f} {100 * us / total:5.1f}%  {source}")
  by_kind = collections.Counter()
  for name, us in times.items():
    by_kind[kinds.get(name, "runtime (not an HLO op)")] += us
  print(f"\n{'ms/step':>8} {'share':>6}  op kind")
  for kind, us in by_kind.most_common():
    print(f"{per_step(us):8.2f} {100 * us / total:5.1f}%  {kind}")


if __name__ == "__main__":
  cli.start(main)
