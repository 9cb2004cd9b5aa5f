"""Mesh construction, the rule table, and sharded training equal to single-device training."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cla_jax import checkpoint, model as model_lib, sharding, train_step, trainer
from tests import train_helpers as th


@pytest.mark.parametrize("axes, devices, expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=4, tensor=1), 4, (1, 4, 1)),
])
def test_mesh_shape_resolves_minus_one(axes, devices, expected):
  assert sharding.mesh_shape(axes, devices) == expected


@pytest.mark.parametrize("axes, message", [
    (dict(data=3, fsdp=1, tensor=1), "does not match the 8 devices"),
    (dict(data=-1, fsdp=3, tensor=1), "needs a multiple of 3 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "several -1 axes"),
    (dict(data=0, fsdp=1, tensor=8), "mesh.data=0"),
])
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


def test_mesh_222_with_accumulation_matches_single_device(runs):
  sharded, single = th.losses(runs["sharded"][1]), th.losses(runs["single"][1])
  assert sorted(sharded) == [1, 2, 3, 4]
  np.testing.assert_allclose([sharded[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=2e-6)
  assert sharded[4] < sharded[1]


@pytest.mark.parametrize("num_devices, shape", [(1, (1, 1, 1)), (4, (1, 2, 2))])
def test_restore_onto_a_different_mesh(runs, num_devices, shape):
  params, config, step = checkpoint.restore_params(runs["sharded"][1], mesh=sharding.make_mesh(
      dict(data=shape[0], fsdp=shape[1], tensor=shape[2], num_devices=num_devices)))
  reference, _, _ = checkpoint.restore_params(runs["single"][1])
  assert step == 4 and config.mesh.num_devices == 8
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    assert got.sharding.mesh.devices.size == num_devices
    # Adam divides by sqrt(v): reduction-order noise in tiny gradients moves a weight by a fraction of
    # one update (lr = 3e-3), so compare to well below that.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=5e-5)


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


def test_bf16_compute_reduces_gradients_across_devices_in_fp32():
  """The paper's recipe: bf16 matmuls, but the data-parallel gradient all-reduce carries fp32."""
  cfg = model_lib.ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=128,
                              vocab_size=256, dtype="bfloat16")
  mesh = jax.make_mesh((8, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  rows = jax.ShapeDtypeStruct((16, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
  batch = {"inputs": rows, "targets": rows,
           "weights": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=sharding.batch_sharding(mesh))}
  grad = jax.grad(lambda p, b: train_step.loss_fn(p, b, model_lib.Transformer(cfg))[0])
  with jax.set_mesh(mesh):
    hlo = jax.jit(grad, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(params, batch).compile().as_text()
  reduces = [line.split("all-reduce(")[0] for line in hlo.splitlines() if re.search(r"= .*all-reduce\(", line)]
  assert reduces, "expected a gradient all-reduce over the data axis"
  assert all("bf16" not in r for r in reduces) and any("f32" in r for r in reduces), reduces
