"""Will it fit? Compiles the real train and eval steps for a TPU slice on this (CPU-only) machine.

    cla-aot --config=configs/paper_1b.py:H128-MQA-CLA2 --topology=v5e-256 [--num_slices=N] [--max_batch]

libtpu's compile-only devices stand in for the slice: the trainer's own jitted step (same shardings,
donation and gradient accumulation, traced under the mesh) is lowered with abstract params and optimizer
state, nothing is allocated, and XLA's TPU compiler reports the HBM it needs per chip. `auto` model
choices resolve for TPU, not for this host. Prints a table, then one JSON line (see `check`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cla_jax import config_lib, hlo_stats, optim, sharding, topology
from cla_jax import metrics as metrics_lib
from cla_jax import model as model_lib
from cla_jax import train_step as train_step_lib

MAX_BATCH_PER_CHIP = 4096  # where --max_batch stops looking
FIT_FRACTION = 0.9  # fits: total HBM <= 90% of a chip (XLA and the runtime keep some for themselves)


def _batch_spec(batch_size: int, seq_len: int, packing: bool, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Abstract global batch with the trainer's batch sharding (the fields data/batches.py yields)."""
  shard = sharding.batch_sharding(mesh)
  ints = lambda: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=shard)  # noqa: E731
  batch = {
      "inputs": ints(),
      "targets": ints(),
      "weights": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=shard),
  }
  if packing:
    batch["positions"], batch["segment_ids"] = ints(), ints()
  return batch


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return {
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "alias_bytes": int(stats.alias_size_in_bytes),
      "code_bytes": int(stats.generated_code_size_in_bytes),
  }


def _shard_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def largest_values(fn: Any, args: tuple[Any, ...], mesh: jax.sharding.Mesh, n: int) -> list[dict[str, Any]]:
  """The `n` largest intermediate values of `fn`'s jaxpr (scan bodies included), with their model source.

  Shapes are global; `bytes` divides by the batch parallelism when the value carries the batch dim, which is
  how the activation constraints shard it (an estimate: XLA may fuse a value away or shard it further).
  """
  batch_sizes = {x.shape[0] for x in jax.tree.leaves(args[-1])}
  ways = sharding.batch_parallelism(mesh)
  rows: dict[tuple[str, str], dict[str, Any]] = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        aval = getattr(var, "aval", None)
        if not hasattr(aval, "shape") or not aval.shape:
          continue
        size = math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
        if any(d in batch_sizes for d in aval.shape[:2]):
          size //= ways
        shape = f"{jnp.dtype(aval.dtype).name}[{','.join(map(str, aval.shape))}]"
        source = f"{eqn.source_info.name_stack}/{eqn.primitive.name}"
        key = (shape, source)
        if key not in rows or rows[key]["bytes"] < size:
          rows[key] = {"bytes": size, "shape": shape, "op": eqn.primitive.name, "source": source}
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  with jax.set_mesh(mesh):
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sorted(rows.values(), key=lambda r: -r["bytes"])[:n]


def _total(memory: dict[str, int]) -> int:
  """Peak per chip: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
  return (
      memory["argument_bytes"]
      + memory["output_bytes"]
      - memory["alias_bytes"]
      + memory["temp_bytes"]
      + memory["code_bytes"]
  )


def compile_steps(
    config: ml_collections.ConfigDict, devices: list[Any], platform: str = "tpu", eval_step: bool = True
) -> dict[str, Any]:
  """Lowers and compiles the train (and eval) step of `config` for `devices`; memory, FLOPs, collectives.

  On an out-of-memory compile the result has `fits: False`, the bytes XLA says it needs and its largest
  allocations, instead of raising.
  """
  config_lib.check_values(config)
  mesh = sharding.make_mesh(config.mesh, devices)  # the trainer's mesh over the target's devices
  from cla_jax import trainer  # pylint: disable=g-import-not-at-top  (heavy: orbax, data)

  trainer.check_train_config(config, mesh)
  cfg = config_lib.model_config(config).for_platform(platform)
  sharding.check_model_fits(cfg, mesh)
  model = model_lib.Transformer(cfg)
  tx = optim.make_optimizer(config.train)
  boxed = model_lib.abstract_params(cfg)
  param_shardings, opt_shardings = train_step_lib.state_shardings(boxed, tx, mesh)
  unboxed = jax.tree.map(lambda b: b.value, boxed, is_leaf=lambda x: hasattr(x, "names"))
  params = sharding.shardings_like(unboxed, param_shardings)
  opt_state = sharding.shardings_like(jax.eval_shape(tx.init, unboxed), opt_shardings)
  t = config.train
  batch = _batch_spec(t.batch_size, t.seq_len, bool(config.data.packing), mesh)
  step = train_step_lib.jit_train_step(model, tx, t.grad_accum_steps, mesh, param_shardings, opt_shardings)
  chips = len(devices)
  tokens = t.batch_size * t.seq_len
  model_flops = metrics_lib.flops_per_token(cfg, t.seq_len) * tokens / chips
  result: dict[str, Any] = {
      "batch_per_chip": t.batch_size / chips,
      "global_batch": t.batch_size,
      "seq_len": t.seq_len,
      "grad_accum_steps": t.grad_accum_steps,
      "mesh": dict(mesh.shape),
      "remat": cfg.remat,
      "scan_layers": cfg.scan_layers,
      "attention": cfg.attention_impl,
      "dtype": cfg.dtype,
      "model_flops_per_chip": model_flops,
  }
  with jax.set_mesh(mesh):  # linen's logical constraints are no-ops without a mesh
    lowered = step.jitted.lower(params, opt_state, batch)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError; its type moves between jax versions)
      oom = hlo_stats.parse_oom(str(e))
      if oom is None:
        raise
      result.update(fits=False, **oom)
      result["argument_bytes"] = _shard_bytes((params, opt_state, batch))
      if oom.get("needs_temp_bytes"):
        result["temp_bytes"] = oom["needs_temp_bytes"]
        result["total_bytes"] = oom["needs_temp_bytes"] + result["argument_bytes"]
      # XLA's message names no buffers; the step's largest values (before fusion) say where the bytes are.
      result["largest_temporaries"] = largest_values(step.jitted, (params, opt_state, batch), mesh, 5)
      return result
    memory = _memory(compiled)
    hlo = compiled.as_text()
    flops = hlo_stats.step_flops(hlo)
    result.update(memory)
    result["total_bytes"] = _total(memory)
    result["flops_per_chip"] = flops
    result["recompute_ratio"] = flops / model_flops if model_flops else None
    result["xla_cost_flops"] = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    result["collectives"] = hlo_stats.collectives(hlo)
    result["involuntary_remat"] = hlo_stats.involuntary_remat(hlo)
    result["largest_temporaries"] = hlo_stats.largest_buffers(hlo, 5)
    if eval_step:
      eval_batch = _batch_spec(config.eval.batch_size, t.seq_len, bool(config.data.packing), mesh)
      eval_jit = train_step_lib.jit_eval_step(model, mesh, param_shardings).jitted
      try:
        eval_compiled = eval_jit.lower(params, eval_batch).compile()
        result["eval_total_bytes"] = _total(_memory(eval_compiled))
      except Exception as e:  # pylint: disable=broad-except
        oom = hlo_stats.parse_oom(str(e))
        if oom is None:
          raise
        result["eval_total_bytes"] = (oom.get("needs_temp_bytes") or 0) + _shard_bytes((params, eval_batch))
  return result


def check(
    config: ml_collections.ConfigDict, topology_name: str, num_slices: int = 1, eval_step: bool = True
) -> dict[str, Any]:
  """The fit report of `config` on a TPU slice: the JSON line's fields (see the module docstring)."""
  target = topology.parse(topology_name, num_slices)
  devices = topology.compile_only_devices(target)
  result = {
      "topology": target.name,
      "num_slices": num_slices,
      "chips": target.chips,
      "device_kind": devices[0].device_kind,
      "hbm_per_chip_bytes": target.hbm_per_chip_bytes,
  }
  result.update(compile_steps(config, devices, "tpu", eval_step))
  if "total_bytes" in result:
    result["fits"] = result["total_bytes"] <= FIT_FRACTION * target.hbm_per_chip_bytes
  peak = target.generation.peak_bf16_flops
  if result.get("flops_per_chip"):
    # A lower bound: compute at peak, no communication or memory stalls (XLA's own estimate is not usable).
    result["min_step_seconds"] = result["flops_per_chip"] / peak
  return result


# Remat policies from the least recomputation to the most (on TPU with splash attention; `none` keeps every
# residual). `remat=auto` resolves by a fixed rule (model.ModelConfig.remat_for); this order is what
# `cheapest_remat` walks when asked which policy a given config and slice can afford.
REMAT_ORDER = ("none", "save_dots", "save_qkv_ffn", "full")


def unrolled(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """`config` with `scan_layers=False` when it scans a pattern of several segments, else None.

  XLA schedules such a stack better unrolled (same FLOPs): DenseFront on a v5e-256 needs 17.16 GB a chip
  scanned and 12.09 unrolled, and holds 32 sequences a chip on a v5p-64 scanned and 56 unrolled. With one
  segment unrolling changes nothing XLA schedules.
  """
  cfg = model_lib.ModelConfig.from_config(config.model)
  if not cfg.scan_layers or len(cfg.segments) == 1:
    return None
  trial = ml_collections.ConfigDict(config.to_dict())
  trial.model.scan_layers = False
  return trial


def cheapest_remat(
    config: ml_collections.ConfigDict,
    topology_name: str,
    num_slices: int = 1,
    start: str = "none",
    skip_first: bool = False,
) -> dict[str, Any]:
  """The first setting, from policy `start` on, whose train step fits: {"remat", "scan_layers", "tried"}.

  Each policy of REMAT_ORDER is tried scanned and then, for a pattern of several segments (KeepEnds,
  DenseFront, ...), unrolled: XLA schedules such a stack's segments better unrolled (DenseFront on a v5e-256:
  17.47 GB scanned, 12.21 unrolled, same FLOPs), which is cheaper than the next policy's recomputation.
  `skip_first` skips the first setting (the config as given, already compiled).
  """
  cfg = model_lib.ModelConfig.from_config(config.model)
  also_unrolled = unrolled(config) is not None
  candidates = []
  for remat in REMAT_ORDER[REMAT_ORDER.index(start) :]:
    candidates.append((remat, cfg.scan_layers))
    if also_unrolled:
      candidates.append((remat, False))
  tried = []
  for remat, scan_layers in candidates[1 if skip_first else 0 :]:
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.model.remat, trial.model.scan_layers = remat, scan_layers
    report = check(trial, topology_name, num_slices, eval_step=False)
    setting = {"remat": remat, "scan_layers": scan_layers}
    tried.append({**setting, "fits": bool(report["fits"]), "total_bytes": report.get("total_bytes")})
    if report["fits"]:
      return {**setting, "recompute_ratio": report.get("recompute_ratio"), "tried": tried}
  return {"remat": None, "scan_layers": None, "tried": tried}


def advice(result: dict[str, Any], search: dict[str, Any] | None) -> str | None:
  """One line telling the user what to set, from a remat search; None when there is nothing to say."""
  if search is None:
    return None
  if search["remat"] is None:
    return (
        "no remat policy fits this batch: raise --config.train.grad_accum_steps (the per-chip micro-batch is "
        "what must fit), or use more chips"
    )
  unroll = search.get("scan_layers") is False and result.get("scan_layers", True) is not False
  if search["remat"] == result["remat"] and not unroll:
    return f"remat={search['remat']} is the cheapest policy that fits"
  settings = [] if search["remat"] == result["remat"] else [f"--config.model.remat={search['remat']}"]
  settings += ["--config.model.scan_layers=False"] if unroll else []
  ratio = search["recompute_ratio"]
  return f"set {' '.join(settings)} (the cheapest setting that fits; recompute ratio {ratio:.3f})"


def max_batch(config: ml_collections.ConfigDict, topology_name: str, num_slices: int = 1) -> dict[str, Any]:
  """The largest per-chip batch (micro-batch, i.e. batch / grad_accum_steps) that fits, in a few compiles.

  A step's memory grows about linearly in the batch (activations) over a fixed part (weights, optimizer
  state), so each probe is where the line through the two measured points nearest the limit crosses it;
  the answer is settled by compiles on both sides of the edge (fits at n, not at n + 1). A prediction
  outside the bracket found so far, or a compile that names no bytes, falls back to doubling or bisection.
  The first probe is the configured batch.
  """
  target = topology.parse(topology_name, num_slices)
  ways = target.chips  # a batch must split over data*fsdp; the per-chip count is searched in whole sequences
  accum = config.train.grad_accum_steps
  limit = FIT_FRACTION * target.hbm_per_chip_bytes
  totals: dict[int, float] = {}
  compiles = []

  def fits(per_chip: int) -> tuple[bool, dict[str, Any]]:
    compiles.append(per_chip)
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.train.batch_size = per_chip * ways * accum
    report = check(trial, topology_name, num_slices, eval_step=False)
    if report.get("total_bytes"):
      totals[per_chip] = float(report["total_bytes"])
    return bool(report["fits"]), report

  low, high, best = 0, None, None  # low fits (0 trivially), high does not (None: not found yet)
  probe = max(1, config.train.batch_size // (ways * accum))  # the configured batch: the first question asked
  for _ in range(40):
    ok, report = fits(probe)
    if ok:
      low, best = probe, report
    else:
      high = probe
    if (high is not None and high - low <= 1) or low >= MAX_BATCH_PER_CHIP:
      break
    probe = _next_probe(totals, low, high, limit)
  return {"max_batch_per_chip": low, "report": best, "compiles": compiles}


def _next_probe(totals: dict[int, float], low: int, high: int | None, limit: float) -> int:
  """The next batch to compile: where the line through two measured totals crosses `limit`.

  The line runs through the bracket's ends once both are measured (else the two totals nearest the
  limit). While the bracket is wider than 4, the probe stays in its middle half, so a curved memory line
  cannot walk the bracket down one sequence at a time.
  """
  ends = [low, high] if low in totals and high in totals else sorted(totals, key=lambda b: abs(totals[b] - limit))[:2]
  guess = None
  if len(ends) == 2 and totals[ends[0]] != totals[ends[1]]:
    (b1, t1), (b2, t2) = ((b, totals[b]) for b in ends)
    slope = (t2 - t1) / (b2 - b1)
    if slope > 0:
      guess = int(b1 + (limit - t1) / slope)
  if high is None:
    return 2 * max(low, 1) if guess is None else min(max(guess, low + 1), MAX_BATCH_PER_CHIP)
  width = high - low
  if guess is None:
    return low + width // 2
  margin = width // 4 if width > 4 else 1
  return min(max(guess, low + margin), high - margin)


# ----------------------------------------------------------------------------- output


def _gb(n: float | None) -> str:
  return "-" if n is None else f"{n / 1e9:.2f} GB"


def table(result: dict[str, Any]) -> str:
  """The human-readable report."""
  rows = [
      ("topology", f"{result['topology']} x{result['num_slices']} ({result['chips']} chips, {result['device_kind']})"),
      ("mesh", " ".join(f"{k}={v}" for k, v in result["mesh"].items())),
      (
          "batch",
          f"{result['global_batch']} x {result['seq_len']} tokens ({result['batch_per_chip']:g} per chip, "
          f"{result['grad_accum_steps']} micro-batches)",
      ),
      ("model", f"remat={result['remat']} attention={result['attention']} dtype={result['dtype']}"),
      ("HBM per chip", _gb(result["hbm_per_chip_bytes"])),
  ]
  if "flops_per_chip" in result:  # compiled; an out-of-memory compile has only XLA's byte counts
    rows += [
        ("arguments", _gb(result["argument_bytes"])),
        ("temporaries", _gb(result["temp_bytes"])),
        ("total", f"{_gb(result['total_bytes'])} ({result['total_bytes'] / result['hbm_per_chip_bytes']:.0%})"),
        ("eval step", _gb(result.get("eval_total_bytes"))),
        ("FLOPs per chip", f"{result['flops_per_chip']:.3g} (model {result['model_flops_per_chip']:.3g})"),
        ("recompute ratio", f"{result['recompute_ratio']:.3f}"),
        ("min step time", f"{result['min_step_seconds'] * 1e3:.0f} ms at peak bf16"),
        (
            "collectives",
            ", ".join(f"{k} {v['count']}x {_gb(v['bytes'])}" for k, v in result["collectives"].items()) or "none",
        ),
    ]
    for buf in result["largest_temporaries"][:3]:
      rows.append(("large buffer", f"{_gb(buf['bytes'])} {buf['shape']} {buf['source']}"))
  else:
    rows.append(("arguments", _gb(result.get("argument_bytes"))))
    rows.append(
        (
            "temporaries",
            f"{_gb(result.get('temp_bytes'))} (XLA: does not fit; usable HBM "
            f"{_gb(result.get('usable_hbm_bytes'))})",
        )
    )
    rows.append(("total", _gb(result.get("total_bytes"))))
    for buf in result.get("largest_temporaries", [])[:5]:
      rows.append(("large value", f"~{_gb(buf['bytes'])} per chip {buf['shape']} {buf['source']}"))
  rows.append(("fits", "yes" if result["fits"] else f"NO (limit {FIT_FRACTION:.0%} of HBM)"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
