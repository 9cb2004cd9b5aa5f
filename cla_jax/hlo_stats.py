"""Facts read off a compiled XLA module's text: FLOPs with loop trip counts, collectives, big buffers, OOMs.

Why parse text: `compiled.cost_analysis()` counts the body of a while loop once (the scanned layer stack runs
its body num_groups times, gradient accumulation its own loop accum_steps times), and knows nothing of the
FLOPs inside Pallas kernels. Here every computation's matmul FLOPs (dot and convolution instructions, and the
splash attention kernels from their operand shapes) are summed, and each call site multiplies its callee's
total by how often it runs: a while body by its trip count (XLA's `known_trip_count` where the module keeps
it, else the condition's `i < N` divided by the counter's step: TPU windowed einsums step by 2), fusions and
calls once. Elementwise work is left out on both sides of the recompute ratio: the model's FLOPs
(`metrics.flops_per_token`) count matmuls only as well.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array type in `text` (a result type, possibly a tuple)."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def _bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays)


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: its name, result type, opcode and the rest of its line."""

  name: str
  result: str
  op: str
  rest: str

  @property
  def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
    return _arrays(self.result)

  @property
  def source(self) -> str:
    """The jax op_name (model scope path) XLA kept in the metadata."""
    found = re.search(r'op_name="([^"]*)"', self.rest)
    return found.group(1) if found else ""


def parse(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith("ENTRY"):
        entry = header.group(1)
      continue
    found = _INSTRUCTION.match(line) if current is not None else None
    if found:
      current.append(Instruction(*found.groups()))
  return computations, entry


def _operand_names(rest: str) -> list[str]:
  """The %names inside an instruction's operand list."""
  depth, close = 1, len(rest)
  for index, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      close = index
      break
  return re.findall(r"%([\w.\-]+)", rest[:close])


def _dot_flops(inst: Instruction, shapes: dict[str, tuple[int, ...]]) -> float:
  """2 * output elements * contracted size, for dot and (matmul-shaped or windowed) convolution."""
  out = inst.arrays
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])
  operands = _operand_names(inst.rest)
  if inst.op == "dot":
    lhs = shapes.get(operands[0]) if operands else None
    dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.rest)
    if lhs is None or dims is None:
      return 0.0
    return 2.0 * out_elems * math.prod(lhs[int(i)] for i in dims.group(1).split(",") if i)
  # convolution: XLA:TPU writes matmuls with batch dims as convolutions whose "window" slides over padding
  # (size n, pad n-1 on both sides: only one position per output lands on data), so the window is not the
  # contracted size: count, per spatial dim, the (output position, window position) pairs that land on input.
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.rest)
  if labels is None or len(operands) < 2:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  lhs, rhs = shapes.get(operands[0]), shapes.get(operands[1])
  if lhs is None or rhs is None or len(lhs) != len(lhs_labels) or len(rhs) != len(rhs_labels):
    return 0.0
  out_dims = out[0][1]
  window = re.search(r"window=\{([^}]*)\}", inst.rest)
  attrs = dict(re.findall(r"(\w+)=(\S+)", window.group(1))) if window else {}
  spatial = sorted(c for c in lhs_labels if c.isdigit())

  def per_dim(key: str, default: str) -> list[str]:
    return attrs[key].split("x") if key in attrs else [default] * len(spatial)

  sizes, strides = per_dim("size", "1"), per_dim("stride", "1")
  pads, lhs_dil, rhs_dil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
  pairs = 1
  for k, dim in enumerate(spatial):
    size_in, size_out = lhs[lhs_labels.index(dim)], out_dims[out_labels.index(dim)]
    w, stride, ld, rd = int(sizes[k]), int(strides[k]), int(lhs_dil[k]), int(rhs_dil[k])
    low = int(pads[k].split("_")[0])
    dilated = (size_in - 1) * ld + 1
    pairs *= sum(
        1
        for o in range(size_out)
        for j in range(w)
        if 0 <= o * stride + j * rd - low < dilated and (o * stride + j * rd - low) % ld == 0
    )
  # Output elements per spatial position (batch x output features) x input features x landing pairs.
  per_position = math.prod(n for c, n in zip(out_labels, out_dims) if not c.isdigit())
  contracted = rhs[rhs_labels.index("i")]
  groups = re.search(r"batch_group_count=(\d+)", inst.rest)
  if groups:  # weight-gradient form: each output also sums over its group's share of the lhs batch
    contracted *= lhs[lhs_labels.index("b")] // int(groups.group(1))
  return 2.0 * per_position * contracted * pairs


# Matmuls per kernel call, each over the visited (query block, key block) pairs: forward QK^T and PV; dq
# recomputes QK^T, then dP = dO V^T and dQ = dS K; dkv recomputes QK^T and dP, then dV = P^T dO and dK = dS^T Q,
# and, fused (no separate dq kernel), also dQ = dS K.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "fused": 5}


def _splash_flops(inst: Instruction) -> float:
  """FLOPs of one splash kernel call, from its q and k operand shapes and the causal block fraction."""
  kind = next((k for k in ("dkv", "dq", "fwd") if f"splash_mqa_{k}" in inst.name or f"_{k}" in inst.name), None)
  layouts = re.search(r"operand_layout_constraints=\{(.*?)\}, (?:frontend|metadata|backend)", inst.rest)
  if kind is None or layouts is None:
    return 0.0
  arrays = [a for a in _arrays(layouts.group(1)) if a[0] in ("bf16", "f32", "f16") and len(a[1]) >= 2]
  if len(arrays) < 2:
    return 0.0
  q, k = arrays[0][1], arrays[1][1]
  t, s = q[-2], k[-2]
  block = next((b for b in (512, 256, 128) if s % b == 0), s)
  n = s // block
  # The fused backward's extra result: dq unreduced over the n key blocks ([..., n, heads, t, h]).
  if kind == "dkv" and any(len(dims) == len(q) + 1 and math.prod(dims) == n * math.prod(q) for _, dims in inst.arrays):
    kind = "fused"
  causal = (n + 1) / (2 * n) if t == s else 1.0  # block pairs on or below the diagonal
  return _SPLASH_MATMULS[kind] * 2.0 * math.prod(q) * s * causal


def _constants(instructions: list[Instruction]) -> dict[str, int]:
  """{name: value} of the integer scalar constants among `instructions`."""
  out = {}
  for inst in instructions:
    value = re.match(r"(-?\d+)\)", inst.rest) if inst.op == "constant" else None
    if value:
      out[inst.name] = int(value.group(1))
  return out


def _tuple_index(inst: Instruction | None) -> int | None:
  """j of a `get-tuple-element(...), index=j` instruction, else None."""
  found = re.search(r"index=(\d+)", inst.rest) if inst is not None and inst.op == "get-tuple-element" else None
  return int(found.group(1)) if found else None


def _trip_count(condition: list[Instruction], body: list[Instruction]) -> int:
  """Trips of a loop whose condition is `i < N` on a counter the body steps by a constant (XLA unrolls some
  loops: TPU's windowed einsums step their counter by 2 against the same N); 1 for any other form."""
  by_name = {inst.name: inst for inst in condition}
  constants = _constants(condition)
  for inst in condition:
    if inst.op != "compare" or "direction=LT" not in inst.rest:
      continue
    operands = _operand_names(inst.rest)
    bound = next((constants[n] for n in operands if n in constants), None)
    counter = next((_tuple_index(by_name.get(n)) for n in operands if n not in constants), None)
    if bound is None:
      continue
    return -(-bound // _counter_step(body, counter))
  return 1


def _counter_step(body: list[Instruction], counter: int | None) -> int:
  """What the loop body adds to tuple element `counter` each trip (1 when that is not a constant add)."""
  root = next((inst for inst in body if inst.op == "tuple" and inst is body[-1]), None)
  if counter is None or root is None:
    return 1
  operands = _operand_names(root.rest)
  by_name, constants = {inst.name: inst for inst in body}, _constants(body)
  update = by_name.get(operands[counter]) if counter < len(operands) else None
  if update is None or update.op != "add":
    return 1
  names = _operand_names(update.rest)
  steps = [constants[n] for n in names if n in constants]
  reads_counter = any(_tuple_index(_through_copies(by_name.get(n), by_name)) == counter for n in names)
  return steps[0] if reads_counter and len(steps) == 1 and steps[0] > 0 else 1


def _through_copies(inst: Instruction | None, by_name: dict[str, Instruction]) -> Instruction | None:
  """The instruction a chain of copies starts from (XLA:TPU copies a windowed loop's counter before adding)."""
  while inst is not None and inst.op == "copy":
    operands = _operand_names(inst.rest)
    inst = by_name.get(operands[0]) if operands else None
  return inst


def _callees(inst: Instruction, computations: dict[str, list[Instruction]]) -> list[tuple[str, int]]:
  """(callee, times it runs per execution of `inst`)."""
  if inst.op == "while":
    body = re.search(r"body=%([\w.\-]+)", inst.rest)
    cond = re.search(r"condition=%([\w.\-]+)", inst.rest)
    if body is None:
      return []
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.rest)  # XLA's own analysis, when it kept it
    if known:
      trips = int(known.group(1))
    else:
      trips = _trip_count(computations.get(cond.group(1), []), computations.get(body.group(1), [])) if cond else 1
    return [(body.group(1), trips)]
  called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", inst.rest)
  branches = re.search(r"branch_computations=\{([^}]*)\}", inst.rest)
  if branches:
    called += re.findall(r"%([\w.\-]+)", branches.group(1))
  if inst.op in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map", "all-reduce"):
    return []  # their to_apply is a scalar reducer, not a matmul
  return [(c, 1) for c in called]


class Module:
  """A parsed compiled module with per-computation totals that include trip counts."""

  def __init__(self, hlo: str):
    self.computations, self.entry = parse(hlo)

  @functools.cache  # noqa: B019  (one Module per compiled step; freed with it)
  def _flops(self, name: str) -> float:
    instructions = self.computations.get(name, [])
    shapes = {i.name: i.arrays[0][1] for i in instructions if len(i.arrays) == 1}
    # Parameters of fused computations are named by the caller's operands; their shapes are declared inline.
    total = 0.0
    for inst in instructions:
      if inst.op in ("dot", "convolution"):
        total += _dot_flops(inst, shapes)
      elif inst.op == "custom-call" and "splash" in inst.name:
        total += _splash_flops(inst)
      for callee, times in _callees(inst, self.computations):
        total += times * self._flops(callee)
    return total

  def flops(self) -> float:
    return self._flops(self.entry)

  def _walk(self, name: str, times: int, owner: tuple[str, ...]):
    """(instruction, how often it runs per step, `owner`: the path of loop bodies and calls it runs in; a
    fused computation runs in its caller's)."""
    for inst in self.computations.get(name, []):
      yield inst, times, owner
      for callee, k in _callees(inst, self.computations):
        if callee not in owner:
          yield from self._walk(callee, times * k, owner if inst.op == "fusion" else (*owner, callee))

  def collectives(self) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} per step (loop bodies times their trip counts); bytes of each result.

    XLA:TPU's async collective fusions hold the same collective in the start, continuation and done fusions
    (one channel_id): a collective is counted once per channel in the computation it runs in.
    """
    out: dict[str, dict[str, int]] = {}
    counted: set[tuple[tuple[str, ...], str]] = set()
    for inst, times, owner in self._walk(self.entry, 1, (self.entry,)):
      kind = inst.op.removesuffix("-start")
      if kind in COLLECTIVES and not inst.op.endswith("-done"):
        channel = re.search(r"channel_id=(\d+)", inst.rest)
        if channel:
          if (owner, channel.group(1)) in counted:
            continue
          counted.add((owner, channel.group(1)))
        arrays = inst.arrays
        if inst.op.endswith("-start") and kind == "all-gather":
          arrays = arrays[len(arrays) // 2 :]  # (operands, results) tuple: count the gathered results
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += times
        entry["bytes"] += times * _bytes(arrays)
    return out

  def largest(self, n: int) -> list[dict[str, Any]]:
    """The `n` largest single results of non-fused instructions (candidates for what fills HBM), biggest first."""
    skip = {"parameter", "tuple", "get-tuple-element", "bitcast", "while", "constant", "call", "conditional"}
    fused = {c for insts in self.computations.values() for i in insts for c, _ in _callees(i, self.computations)}
    fused -= {
        re.search(r"body=%([\w.\-]+)", i.rest).group(1)
        for insts in self.computations.values()
        for i in insts
        if i.op == "while"
    }
    rows = []
    for name, instructions in self.computations.items():
      if name in fused:
        continue
      for inst in instructions:
        if inst.op in skip:
          continue
        for dtype, dims in inst.arrays:
          shape = f"{dtype}[{','.join(map(str, dims))}]"
          rows.append({"bytes": _bytes([(dtype, dims)]), "shape": shape, "op": inst.op, "source": inst.source})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:n]


def step_flops(hlo: str) -> float:
  """Matmul FLOPs of one execution of the compiled module (per device), loop trip counts included."""
  return Module(hlo).flops()


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """Collective ops per execution, by kind: {count, bytes}."""
  return Module(hlo).collectives()


def largest_buffers(hlo: str, n: int) -> list[dict[str, Any]]:
  """The `n` largest instruction results with their model source."""
  return Module(hlo).largest(n)


def involuntary_remat(hlo: str) -> list[str]:
  """Sources of instructions XLA rematerialised on its own to save memory (named `.remat` in the module)."""
  found = []
  for instructions in parse(hlo)[0].values():
    for inst in instructions:
      if ".remat" in inst.name and inst.source not in found:
        found.append(inst.source)
  return found


# libtpu: "Ran out of memory on HBM, the total memory required for HLO temporaries (100.55G) exceeds available
# HBM (15.75G)." (G = GiB: 15.75G is a v5e's 16 GiB less what the runtime reserves); older releases say "Used X
# of Y hbm".
_OOM = re.compile(r"(?:temporaries \(|Used )([\d.]+)([KMGT]?)")
_AVAILABLE = re.compile(r"(?:available HBM \(| of )([\d.]+)([KMGT]?)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> dict[str, Any] | None:
  """{needs_bytes, largest_allocations} from XLA's 'Ran out of memory in memory space hbm' error, else None."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  used, available = _OOM.search(message), _AVAILABLE.search(message)
  needs = float(used.group(1)) * _UNITS[used.group(2)] if used else None
  usable = float(available.group(1)) * _UNITS[available.group(2)] if available else None
  allocations = []
  for block in re.split(r"\n\s*\d+\. ", message)[1:]:
    size = re.search(r"Size: ([\d.]+)([KMGT]?)", block)
    what = re.search(r'Operator: op_name="([^"]*)"', block) or re.search(r"XLA Label: (\S+)", block)
    shape = re.search(r"Shape: (\S+)", block)
    if size:
      allocations.append(
          {
              "bytes": int(float(size.group(1)) * _UNITS[size.group(2)]),
              "what": " ".join(x.group(1) for x in (shape, what) if x),
          }
      )
  return {
      "needs_temp_bytes": int(needs) if needs else None,
      "usable_hbm_bytes": int(usable) if usable else None,
      "largest_allocations": allocations[:8],
  }
