"""TPU slice names (`v5e-256`, `v5p-128`, `v5e:4x4`) and their compile-only devices, for checks on a CPU host.

libtpu (the `jax[tpu]` extra) compiles for a TPU topology without any TPU attached: the devices that
`jax.experimental.topologies.get_topology_desc` returns can build a Mesh, and a jit lowered and compiled
on them reports the target's HBM use. Nothing here runs anything on a TPU.

Slice names follow Cloud TPU: the number after `v4-` / `v5p-` counts TensorCores (two per chip, run as one
megacore device), the number after `v5e-` / `v6e-` counts chips (one core each).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from cla_jax.errors import UserError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a TPU generation's slices share."""

  name: str  # as in slice names: v5e, v5p, v4, v6e
  hbm_per_chip_bytes: int
  cores_per_chip: int  # the unit of the number in a slice name: v4-32 is 32 cores = 16 chips
  dims: int  # torus dimensions of the jax topology name (v5e:4x4 vs v5p:4x4x4)
  accelerator_type: str  # Cloud TPU's TPU_ACCELERATOR_TYPE prefix (v5litepod-16 is a v5e-16)
  peak_bf16_flops: float  # per chip, dense; what a step-time estimate divides by


# Cloud TPU system-architecture pages: HBM per chip and bf16 peak per chip.
GENERATIONS = {
    "v4": Generation("v4", 32 * GiB, 2, 3, "v4", 275e12),
    "v5e": Generation("v5e", 16 * GiB, 1, 2, "v5litepod", 197e12),
    "v5p": Generation("v5p", 95 * GiB, 2, 3, "v5p", 459e12),
    "v6e": Generation("v6e", 32 * GiB, 1, 2, "v6e", 918e12),
}


def _torus_2d(chips: int) -> tuple[int, ...] | None:
  """v5e / v6e slice shapes: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  shapes = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
  return shapes.get(chips)


def _torus_3d(chips: int) -> tuple[int, ...] | None:
  """v4 / v5p slice shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (doubling the smallest axis, last first)."""
  if chips < 4 or chips & (chips - 1):
    return None
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    i = max(i for i in range(3) if shape[i] == min(shape))
    shape[i] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice (or `num_slices` identical ones joined by DCN)."""

  name: str  # what the user wrote, normalised: v5e-256
  generation: Generation
  shape: tuple[int, ...]  # chips per torus axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips (= jax devices: v4 / v5p run each chip's two cores as one megacore device) over all slices."""
    return math.prod(self.shape) * self.num_slices

  @property
  def hbm_per_chip_bytes(self) -> int:
    return self.generation.hbm_per_chip_bytes

  @property
  def jax_name(self) -> str:
    """The name `get_topology_desc` takes: v5e:16x16."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"


VALID_NAMES = "v5e-{1,4,8,...,256}, v6e-{1,4,...,256}, v4-{8,16,...}, v5p-{8,16,...}, or v5e:4x4 style"


def parse(name: str, num_slices: int = 1) -> Topology:
  """`v5e-256` / `v5p-128` / `v4-32` / `v6e-8`, or jax's `v5e:16x16`, as a Topology; UserError otherwise."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise UserError(f"--num_slices={num_slices!r} must be a positive integer (slices joined by DCN).")
  text = str(name).strip().lower()
  by_count = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", text)
  by_shape = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", text)
  shape = None
  if by_count:
    generation = GENERATIONS["v5e" if by_count.group(1) == "v5litepod" else by_count.group(1)]
    units = int(by_count.group(2))
    if units % generation.cores_per_chip == 0:
      chips = units // generation.cores_per_chip
      shape = _torus_2d(chips) if generation.dims == 2 else _torus_3d(chips)
  elif by_shape:
    generation = GENERATIONS[by_shape.group(1)]
    shape = tuple(int(s) for s in by_shape.group(2).split("x"))
    if len(shape) != generation.dims or (generation.dims == 2 and _torus_2d(math.prod(shape)) is None):
      shape = None
    elif generation.dims == 3 and shape != _torus_3d(math.prod(shape)):
      shape = None
  if shape is None:
    raise UserError(f"unknown TPU topology {name!r}; valid: {VALID_NAMES}.")
  normal = f"{generation.name}-{math.prod(shape) * generation.cores_per_chip}"
  return Topology(normal, generation, shape, num_slices)


def compile_only_devices(name: str | Topology, num_slices: int = 1) -> list[Any]:
  """The compile-only jax devices of TPU slice `name` (e.g. `v5e-16`), `num_slices` times over."""
  topology = name if isinstance(name, Topology) else parse(name, num_slices)
  # libtpu's environment on a machine without a TPU is set once, when cla_jax is imported (cla_jax/__init__.py).
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  (loads libtpu)

  kwargs: dict[str, Any] = {}
  if topology.num_slices > 1:
    kwargs["num_slices"] = topology.num_slices
  if math.prod(topology.shape) == 1:
    kwargs["chips_per_host_bounds"] = (1, 1, 1)  # the default host is 2x2x1, which one chip cannot fill
  if topology.generation.cores_per_chip == 2:
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as Cloud TPU runs v4 / v5p
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name, **kwargs)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise UserError("compiling for a TPU needs libtpu: pip install 'jax[tpu]' (or this repo's test extra).") from e
    raise
  return list(desc.devices)
