"""Device mesh, the one logical-axis rule table, and the shardings of params and batches.

The mesh has three named axes:
  data    pure data parallelism: params replicated, batch split.
  fsdp    data parallelism that also shards params and optimizer state (ZeRO-3 style) over `embed`.
  tensor  Megatron-style model parallelism over query heads, the MLP hidden width and the vocabulary.

Axis types are `Auto` on purpose: the model is Flax linen, whose logical partitioning emits
`with_sharding_constraint` hints that GSPMD propagates; jax's `Explicit` sharding-in-types mode is
not supported by linen's logical constraints.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cla_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Weights first, then the activation names that model.py constrains, then the decode
# KV cache's (kv_cache.KV_AXES). `kv_heads` stays replicated in training: MQA has one KV head, which cannot be
# split, and K/V are small next to the rest of a layer. The cache is what fills memory in decoding, so its K/V
# heads go over tensor wherever they divide (`logical_sharding`; MQA's one head stays whole).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_kv_heads", None),
    ("activation_vocab", "tensor"),
    ("cache_kv_heads", "tensor"),
)


class MeshError(UserError):
  """A mesh shape that does not fit the devices or the model."""


class LaunchError(UserError):
  """A multi-process environment that is partial or inconsistent."""


# The variables docs/training.md names for clusters jax cannot auto-detect (plain GPU hosts, launch_local.sh).
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_args(environ: Mapping[str, str]) -> dict[str, Any] | None:
  """`jax.distributed.initialize` arguments from LAUNCH_ENV; None when none is set; LaunchError when partial.

  jax reads JAX_COORDINATOR_ADDRESS itself but not the process count or id, so all three are passed.
  """
  present = {name: environ[name].strip() for name in LAUNCH_ENV if environ.get(name, "").strip()}
  if not present:
    return None
  missing = [name for name in LAUNCH_ENV if name not in present]
  if missing:
    raise LaunchError(
        f"{', '.join(present)} set but {' and '.join(missing)} missing: a multi-process launch "
        f"sets all of {', '.join(LAUNCH_ENV)} (or none, to run one process or auto-detect "
        f"TPU / SLURM / Open MPI)."
    )
  address = present["JAX_COORDINATOR_ADDRESS"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise LaunchError(
        f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port, e.g. 10.0.0.1:1234 (process 0's "
        f"host and a free port)."
    )
  numbers = {}
  for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    try:
      numbers[name] = int(present[name])
    except ValueError:
      raise LaunchError(f"{name}={present[name]!r} must be an integer.") from None
  count, index = numbers["JAX_NUM_PROCESSES"], numbers["JAX_PROCESS_ID"]
  if count < 1:
    raise LaunchError(f"JAX_NUM_PROCESSES={count} must be at least 1.")
  if not 0 <= index < count:
    raise LaunchError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}), one id per process.")
  return {"coordinator_address": address, "num_processes": count, "process_id": index}


def _auto_detected_cluster(environ: Mapping[str, str]) -> bool:
  """True on a multi-host TPU slice, a SLURM job or an Open MPI job with more than one task."""

  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1

  return (
      len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
      or count("SLURM_NTASKS") > 1
      or count("OMPI_COMM_WORLD_SIZE") > 1
  )


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> None:
  """Calls `jax.distributed.initialize` when this is one process of a multi-process job.

  Must run before anything touches a jax backend. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID (all three) are passed explicitly; otherwise TPU pods (TPU_WORKER_HOSTNAMES), SLURM and
  Open MPI are left to jax's auto-detection. CPU devices of several processes talk through gloo, so the
  same path runs on a laptop (scripts/launch_local.sh) and in CI.
  """
  environ = os.environ if environ is None else environ
  args = distributed_args(environ)
  if jax.distributed.is_initialized() or (args is None and not _auto_detected_cluster(environ)):
    return
  # Only affects the CPU backend (GPU/TPU use their own collectives); must be set before it starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(args or {}))


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.{data,fsdp,tensor}` (one may be -1) against the device count, or raises MeshError."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  wild = [name for name, s in zip(MESH_AXES, sizes) if s == -1]
  bad = [f"mesh.{name}={s}" for name, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad or len(wild) > 1:
    raise MeshError(
        f"invalid mesh {', '.join(bad) or 'with several -1 axes'}: each axis is a positive size, "
        f"and at most one may be -1 (all remaining devices)."
    )
  fixed = math.prod(s for s in sizes if s != -1)
  if wild:
    if num_devices % fixed:
      raise MeshError(
          f"mesh {dict(zip(MESH_AXES, sizes))} needs a multiple of {fixed} devices, but there are "
          f"{num_devices}; pick sizes whose product divides {num_devices}."
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} does not match "
        f"the {num_devices} devices; set one axis to -1 or make the product {num_devices}."
    )
  return tuple(sizes)


def make_mesh(mesh_config: Any, all_devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices, or the first `mesh.num_devices` (single process).

  On TPU multi-slice (devices with several `slice_index` values), `data` is laid across the slices.
  `all_devices` replaces `jax.devices()` (compile-only devices of a target slice: cla_jax.aot).
  """
  devices = list(jax.devices() if all_devices is None else all_devices)
  full = len(devices)
  wanted = int(mesh_config.get("num_devices", -1))
  if wanted not in (-1, len(devices)):
    if wanted <= 0 or wanted > len(devices) or jax.process_count() > 1:
      raise MeshError(
          f"mesh.num_devices={wanted} must be -1 (all) or between 1 and {len(devices)} " f"(single-process runs only)."
      )
    devices = devices[:wanted]
  shape = mesh_shape(mesh_config, len(devices))
  if num_slices(devices) > 1:
    return Mesh(hybrid_device_layout(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  if len(devices) == full:
    # make_mesh picks a device order that matches the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def num_slices(devices: Sequence[Any]) -> int:
  """How many slices (TPU multi-slice: ICI islands joined by the data-center network) the devices span."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def hybrid_device_layout(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices of several slices as a (data, fsdp, tensor) array: `data` spans the slices, the rest stays within one.

  Between slices only the data-parallel gradient all-reduce crosses the slow DCN, once per step; fsdp's
  all-gathers and tensor parallelism's per-layer collectives stay on each slice's fast ICI links.
  """
  slices = num_slices(devices)
  data, fsdp, tensor = shape
  if data % slices:
    raise MeshError(
        f"the devices span {slices} slices but mesh.data={data} is not a multiple of {slices}: data "
        f"parallelism runs across slices, fsdp and tensor within one; make mesh.data a multiple of "
        f"{slices}."
    )
  return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices)


def batch_parallelism(mesh: Mesh) -> int:
  """How many ways a batch is split (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_model_fits(model_cfg: Any, mesh: Mesh) -> None:
  """Raises MeshError when a sharded model dimension is not divisible by its mesh axis."""
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  for name, value, axis, size in (
      ("num_heads", model_cfg.num_heads, "tensor", tensor),
      ("mlp_dim", model_cfg.mlp_dim, "tensor", tensor),
      ("vocab_size", model_cfg.vocab_size, "tensor", tensor),
      ("d_model", model_cfg.d_model, "fsdp", fsdp),
  ):
    if value % size:
      raise MeshError(
          f"model.{name}={value} is not divisible by mesh.{axis}={size}; choose a mesh.{axis} " f"that divides {value}."
      )


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of boxed (nn.Partitioned) abstract values; unboxed leaves replicate."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def logical_sharding(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh) -> NamedSharding:
  """The rule table's sharding of an array of `shape` whose dims carry logical `axes`; a dim that its mesh
  axes do not divide stays whole (MQA's one KV head over tensor)."""
  spec = nn.logical_to_mesh_axes(tuple(axes), LOGICAL_AXIS_RULES)

  def ways(mesh_axes):
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
    return math.prod(mesh.shape[name] for name in names)

  return NamedSharding(mesh, P(*(a if dim % ways(a) == 0 else None for dim, a in zip(shape, spec))))


def apply(module: nn.Module, params: Any, *args: Any, **kwargs: Any) -> Any:
  """`module.apply({"params": params}, ...)` with the model's logical axis names resolved by the rule table."""
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    return module.apply({"params": params}, *args, **kwargs)


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis split over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this host's rows of each field into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def shardings_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (abstract restore / AOT compile targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=2 tensor=2 (8 cpu devices, 1 process)'."""
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  platform = mesh.devices.flat[0].platform
  return f"{axes} ({mesh.devices.size} {platform} devices, {jax.process_count()} process(es))"


# ---------------------------------------------------------------------------------------------------------
# Meshes for restoring a workdir here: fallbacks when the training mesh does not fit.
# ---------------------------------------------------------------------------------------------------------


def data_parallel_config(num_devices: int | None = None) -> dict[str, int]:
  """A mesh config of pure data parallelism over all devices, or the first `num_devices`."""
  config = {"data": -1, "fsdp": 1, "tensor": 1}
  if num_devices is not None:
    config["num_devices"] = num_devices
  return config


def fitting_mesh(mesh_config: Any, model_cfg: Any, note: bool = False) -> Mesh:
  """`mesh_config`'s mesh when it fits the devices present and the model, else pure data parallelism.

  A checkpoint trained on a pod must still evaluate and decode on one host. `note` prints why to stderr.
  """
  try:
    mesh = make_mesh(mesh_config)
    check_model_fits(model_cfg, mesh)
    return mesh
  except MeshError as e:
    if note:
      print(f"note: {e} Evaluating with pure data parallelism instead.", file=sys.stderr, flush=True)
    return make_mesh(data_parallel_config())


def replicated_mesh() -> Mesh:
  """A one-axis ('data') mesh over every device: params placed on it with P() are replicated everywhere."""
  return jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))


@functools.lru_cache(maxsize=1)
def single_device_mesh() -> Mesh:
  """A (data, fsdp, tensor) = (1, 1, 1) mesh on the first device."""
  devices = np.asarray(jax.devices()[:1]).reshape(1, 1, 1)
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
