"""Mesh construction, the rule table, and sharded training equal to single-device training."""

import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cla_jax import decode, sharding, train_step, trainer
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from tests import train_helpers as th
from tests.model_helpers import small_config


@pytest.mark.parametrize(
    "axes, devices, expected",
    [
        (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
        (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
        (dict(data=1, fsdp=4, tensor=1), 4, (1, 4, 1)),
    ],
)
def test_mesh_shape_resolves_minus_one(axes, devices, expected):
  assert sharding.mesh_shape(axes, devices) == expected


@pytest.mark.parametrize(
    "axes, message",
    [
        (dict(data=3, fsdp=1, tensor=1), "does not match the 8 devices"),
        (dict(data=-1, fsdp=3, tensor=1), "needs a multiple of 3 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), "several -1 axes"),
        (dict(data=0, fsdp=1, tensor=8), "mesh.data=0"),
    ],
)
def test_bad_mesh_is_a_clear_error(axes, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.mesh_shape(axes, 8)


def test_rule_table_shards_weights_as_documented(tiny_config):
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  cfg = model_lib.ModelConfig.from_config(tiny_config.model)
  specs = jax.tree.map(lambda s: tuple(s.spec), sharding.logical_shardings(model_lib.abstract_params(cfg), mesh))
  layer, kv = specs["segment_0"]["layer_0"], specs["segment_0"]["kv"]
  assert layer["query"] == (None, "fsdp", "tensor", None)  # [layers, d, heads, head_dim]
  assert layer["down"] == (None, "tensor", "fsdp")  # [layers, mlp, d]
  assert kv["key"] == (None, "fsdp", None, None)  # kv_heads never split over tensor (MQA has one)
  assert specs["embed"] == ("tensor", "fsdp")
  assert layer["attn_norm"]["scale"] == (None, "fsdp")


@pytest.mark.parametrize("kv_heads, heads_axis", [(2, "tensor"), (1, None)], ids=["gqa", "mqa"])
def test_rule_table_places_the_kv_cache(tiny_config, kv_heads, heads_axis):
  # Rows over (data, fsdp); K/V heads over tensor where they divide, whole for MQA's one head; int8 scales alike.
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  cfg = model_lib.ModelConfig.from_config({**tiny_config.model, "num_kv_heads": kv_heads})
  for segment in decode.cache_shardings(cfg, mesh, "int8"):
    keys, values, key_scales, value_scales = (tuple(s.spec) for s in segment)
    assert keys == values == (None, ("data", "fsdp"), heads_axis, None, None)  # [groups, b, k, rows, lanes]
    assert key_scales == value_scales == (None, heads_axis, ("data", "fsdp"), None)  # [groups, k, b, slots]


def test_model_dimension_not_divisible_by_tensor_is_an_error(tiny_config):
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
  cfg = model_lib.ModelConfig.from_config(tiny_config.model)
  with pytest.raises(sharding.MeshError, match="model.num_heads=4 is not divisible by mesh.tensor=8"):
    sharding.check_model_fits(cfg, mesh)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4-step run on mesh (2,2,2) with 2 accumulation micro-batches, and on 1 device."""
  root = tmp_path_factory.mktemp("sharded")
  th.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  corpus = th.write_corpus(root / "text"), str(root / "cache")
  out = {}
  for name, devices, mesh, accum in (("sharded", 8, (2, 2, 2), 2), ("single", 1, (1, 1, 1), 1)):
    config = th.use_corpus(th.tiny_config(), corpus, num_devices=devices, mesh=mesh)
    config.train.update(steps=4, log_every=1, grad_accum_steps=accum)
    config.checkpoint.update(every_steps=2)
    trainer.run(config, str(root / name))
    out[name] = (config, root / name)
  return out


@pytest.mark.slow
def test_mesh_222_with_accumulation_matches_single_device(runs):
  sharded, single = th.losses(runs["sharded"][1]), th.losses(runs["single"][1])
  assert sorted(sharded) == [1, 2, 3, 4]
  np.testing.assert_allclose([sharded[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=2e-6)
  assert sharded[4] < sharded[1]


@pytest.mark.slow
@pytest.mark.parametrize("num_devices, shape", [(1, (1, 1, 1)), (4, (1, 2, 2))])
def test_restore_onto_a_different_mesh(runs, num_devices, shape):
  params, config, step = workdir_lib.restore_params(
      runs["sharded"][1],
      mesh=sharding.make_mesh(dict(data=shape[0], fsdp=shape[1], tensor=shape[2], num_devices=num_devices)),
  )
  reference, _, _ = workdir_lib.restore_params(runs["single"][1])
  assert step == 4 and config.mesh.num_devices == 8
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    assert got.sharding.mesh.devices.size == num_devices
    # Adam divides by sqrt(v): reduction-order noise in tiny gradients moves a weight by a fraction of
    # one update (lr = 3e-3), so compare to well below that.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_resume_on_a_different_mesh_continues_the_run(runs, tmp_path):
  """Trained 2 steps on 8 devices, resumed on 1 device: steps 3-4 match the 1-device run."""
  import shutil  # pylint: disable=g-import-not-at-top

  config, workdir = runs["sharded"]
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")  # as if the 8-device job had died after step 2
  config = th.tiny_config().copy_and_resolve_references()
  config = th.use_corpus(config, (runs["single"][0].data.text_glob, runs["single"][0].data.cache_dir))
  config.train.update(steps=4, log_every=1)
  config.checkpoint.update(every_steps=2)
  trainer.run(config, str(resumed))
  got, want = th.losses(resumed), th.losses(runs["single"][1])
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=2e-6)


@pytest.mark.slow
def test_bf16_compute_reduces_gradients_across_devices_in_fp32():
  """The paper's recipe: bf16 matmuls, but the data-parallel gradient all-reduce carries fp32."""
  cfg = small_config(
      num_layers=2, d_model=64, num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=128, vocab_size=256, dtype="bfloat16"
  )
  mesh = jax.make_mesh((8, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  rows = jax.ShapeDtypeStruct((16, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
  batch = {
      "inputs": rows,
      "targets": rows,
      "weights": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=sharding.batch_sharding(mesh)),
  }
  grad = jax.grad(lambda p, b: train_step.loss_fn(p, b, model_lib.Transformer(cfg))[0])
  with jax.set_mesh(mesh):
    hlo = jax.jit(grad, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(params, batch).compile().as_text()
  reduces = [line.split("all-reduce(")[0] for line in hlo.splitlines() if re.search(r"= .*all-reduce\(", line)]
  assert reduces, "expected a gradient all-reduce over the data axis"
  assert all("bf16" not in r for r in reduces) and any("f32" in r for r in reduces), reduces


# Compiles the train step of the tiny model on each mesh, then a control that must warn. In a subprocess: XLA's
# SPMD partitioner reports a rematerialization only as a C++ log line on stderr (no API exposes it).
_COMPILE_SCRIPT = r"""
import sys
sys.path.insert(0, "tests")
import flax.linen as nn, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from tests import train_helpers as th
from cla_jax import config_lib, model as model_lib, optim, sharding, train_step
config = th.tiny_config()
cfg, tx = config_lib.model_config(config), optim.make_optimizer(config.train)
for shape in [tuple(map(int, s.split(","))) for s in sys.argv[1:]]:
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape), num_devices=shape[0] * shape[1] * shape[2]))
  boxed = model_lib.abstract_params(cfg)
  param_shardings, opt_shardings = train_step.state_shardings(boxed, tx, mesh)
  params = sharding.shardings_like(nn.meta.unbox(boxed), param_shardings)
  opt_state = sharding.shardings_like(jax.eval_shape(tx.init, nn.meta.unbox(boxed)), opt_shardings)
  rows = lambda dtype: jax.ShapeDtypeStruct((8, 32), dtype, sharding=sharding.batch_sharding(mesh))
  batch = {"inputs": rows(jnp.int32), "targets": rows(jnp.int32), "weights": rows(jnp.float32)}
  step = train_step.jit_train_step(model_lib.Transformer(cfg), tx, 1, mesh, param_shardings, opt_shardings)
  with jax.set_mesh(mesh):
    step.jitted.lower(params, opt_state, batch).compile()
  print(f"COMPILED {shape}", file=sys.stderr, flush=True)
# The control: the old embedding lookup, a gather from a table sharded (None, fsdp) whose output is
# constrained to the batch axes; its gradient cannot reach the table's sharding without a full remat.
mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1, num_devices=4))
table_sharding = NamedSharding(mesh, P(None, "fsdp"))
def lookup_loss(table, ids):
  x = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0), sharding.batch_sharding(mesh, 3))
  return jnp.sum(x * x)
jax.jit(jax.grad(lookup_loss), out_shardings=table_sharding).lower(
    jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=table_sharding),
    jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))).compile()
print("COMPILED control", file=sys.stderr, flush=True)
"""
_REMAT = "Involuntary full rematerialization"


@pytest.mark.slow
def test_train_step_compiles_without_involuntary_full_rematerialization():
  meshes = ["8,1,1", "1,8,1", "2,2,2", "2,2,1", "1,2,4"]
  env = {**th.env(), "TF_CPP_MIN_LOG_LEVEL": "0"}  # 8 CPU devices, as in this process
  out = subprocess.run(
      [sys.executable, "-c", _COMPILE_SCRIPT, *meshes],
      cwd=th.REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # Split the log at each "COMPILED" line: the warnings before it belong to that compile.
  chunks = out.stderr.split("COMPILED ")
  assert len(chunks) == len(meshes) + 2, out.stderr[-3000:]
  for mesh, log in zip(meshes + ["control"], chunks[:-1]):
    warnings = [line[:300] for line in log.splitlines() if _REMAT in line]
    if mesh == "control":
      assert warnings, "the control lookup should report a rematerialization: is the detector still working?"
    else:
      assert not warnings, f"mesh ({mesh}): {warnings}"


class _StandInDevice:
  """What mesh layout reads of a device, for a multi-slice pod this machine does not have."""

  platform, device_kind = "cpu", "stand-in"

  def __init__(self, device_id: int, slice_index: int):
    self.id, self.slice_index, self.process_index = device_id, slice_index, device_id // 2

  def __repr__(self):
    return f"D{self.id}@s{self.slice_index}"


@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 1, 2), (4, 2, 1)])
def test_multi_slice_mesh_puts_data_across_slices(shape):
  devices = [_StandInDevice(i, i // 4) for i in range(8)]  # 2 slices of 4
  layout = sharding.hybrid_device_layout(shape, devices)
  assert layout.shape == shape and sorted(d.id for d in layout.flat) == list(range(8))
  slice_of = np.vectorize(lambda d: d.slice_index)(layout)
  half = shape[0] // 2
  # Every (fsdp, tensor) block of one data index lies in one slice: only data-parallel traffic crosses slices.
  np.testing.assert_array_equal(slice_of[:half], 0)
  np.testing.assert_array_equal(slice_of[half:], 1)


def test_multi_slice_mesh_needs_data_to_span_the_slices():
  devices = [_StandInDevice(i, i // 2) for i in range(8)]  # 4 slices of 2
  assert sharding.num_slices(devices) == 4 and sharding.num_slices(jax.devices()) == 1
  with pytest.raises(sharding.MeshError, match="span 4 slices but mesh.data=2 is not a multiple of 4"):
    sharding.hybrid_device_layout((2, 2, 2), devices)
