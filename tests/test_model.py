"""The Flax CLA model against independent references: numpy, an unscanned loop, a standard transformer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import attention, config_lib
from cla_jax import model as model_lib
from cla_jax.model import ConfigError, ModelConfig, Transformer
from tests import numpy_reference as ref
from tests.model_helpers import random_params, small_config, tokens_for

PATTERNS = ["none", "cla2", "cla3", "keep_ends", "dense_front", "dense_back"]
ATTENTION = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}


def apply(cfg: ModelConfig, params, *args):
  return jax.jit(Transformer(cfg).apply)({"params": params}, *args)


@pytest.mark.fast_case("keep_ends-GQA")
@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_scanned_equals_unscanned_and_numpy(pattern, attention):
  heads, kv_heads = ATTENTION[attention]
  # head_dim * heads (40) != d_model (32), as in the paper's H46/H90 rows.
  cfg = small_config(pattern=pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=10)
  params, tokens = random_params(cfg), tokens_for(cfg)
  scanned = apply(cfg, params, tokens)
  unscanned_cfg = dataclasses.replace(cfg, scan_layers=False)
  unscanned = apply(unscanned_cfg, model_lib.unstack_params(params, cfg), tokens)
  expected = ref.forward(jax.device_get(params), np.asarray(tokens))
  np.testing.assert_allclose(scanned, expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(unscanned, expected, atol=2e-5, rtol=1e-5)


def test_param_tree_has_one_kv_block_per_group():
  cfg = small_config(pattern="keep_ends", num_layers=6)  # groups {0},{1,2},{3,4},{5}
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  assert params["segment_0"]["kv"]["key"].shape[0] == 1
  assert params["segment_1"]["kv"]["key"].shape[0] == 2
  assert sorted(k for k in params["segment_1"] if k.startswith("layer_")) == ["layer_0", "layer_1"]
  assert params["segment_2"]["kv"]["key"].shape[0] == 1
  assert "segment_3" not in params


def test_layernorm_and_tied_embeddings_match_numpy():
  cfg = small_config(pattern="cla2", norm="layernorm", tie_embeddings=True)
  params, tokens = random_params(cfg), tokens_for(cfg)
  assert "lm_head" not in params
  got = apply(cfg, params, tokens)
  expected = ref.forward(jax.device_get(params), np.asarray(tokens), norm_kind="layernorm", tie_embeddings=True)
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_packed_segments_match_numpy():
  cfg = small_config(pattern="cla2")
  params, tokens = random_params(cfg), tokens_for(cfg)
  segment_ids = jnp.array([[0] * 5 + [1] * 7, [0] * 12], jnp.int32)
  positions = jnp.array([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)
  got = apply(cfg, params, tokens, positions, segment_ids)
  expected = ref.forward(
      jax.device_get(params), np.asarray(tokens), positions=np.asarray(positions), segment_ids=np.asarray(segment_ids)
  )
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def standard_transformer(params, tokens, num_layers):
  """A textbook pre-norm Llama block stack: each layer projects its own Q, K, V from one norm."""
  groups = ref.split_layers(jax.device_get(params))
  assert len(groups) == num_layers
  x = np.asarray(params["embed"], np.float64)[np.asarray(tokens)]
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  for kv, (layer,) in groups:
    h = ref.norm(x, layer["attn_norm"])
    q = ref.rope(np.einsum("btd,dnh->btnh", h, layer["query"]), positions, 10000.0)
    k = ref.rope(np.einsum("btd,dkh->btkh", h, kv["key"]), positions, 10000.0)
    v = np.einsum("btd,dkh->btkh", h, kv["value"])
    x = x + np.einsum("btnh,nhd->btd", ref.attend(q, k, v), layer["out"])
    h = ref.norm(x, layer["mlp_norm"])
    x = x + ((h @ layer["gate"]) / (1 + np.exp(-(h @ layer["gate"]))) * (h @ layer["up"])) @ layer["down"]
  x = ref.norm(x, {"scale": np.asarray(params["final_norm"]["scale"], np.float64)})
  return x @ np.asarray(params["lm_head"], np.float64)


def test_share_factor_one_is_a_standard_transformer():
  cfg = small_config(pattern="none", num_layers=3)
  params = random_params(cfg)
  # A standard layer normalises once for Q, K and V: tie each KV norm to its layer's attention norm.
  params["segment_0"]["kv"]["norm"]["scale"] = params["segment_0"]["layer_0"]["attn_norm"]["scale"]
  tokens = tokens_for(cfg)
  got = apply(cfg, params, tokens)
  np.testing.assert_allclose(got, standard_transformer(params, tokens, 3), atol=2e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = small_config(pattern="cla2", num_heads=4, num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  params, tokens = random_params(gqa), tokens_for(gqa)
  mha_params = jax.tree.map(lambda a: a, params)
  for name in [k for k in params if k.startswith("segment_")]:
    for w in ("key", "value"):  # [layers, d, k, h] -> [layers, d, n, h], each KV head serving 2 query heads
      mha_params[name]["kv"][w] = jnp.repeat(params[name]["kv"][w], 2, axis=2)
  np.testing.assert_allclose(apply(gqa, params, tokens), apply(mha, mha_params, tokens), atol=1e-5, rtol=1e-5)


def test_causal():
  cfg = small_config(pattern="cla3")
  params, tokens = random_params(cfg), tokens_for(cfg, batch=1, length=16)
  t = 9
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
  before = apply(cfg, params, tokens)
  after = apply(cfg, params, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-4


def test_consumer_layer_gradients_reach_the_producer_kv():
  cfg = small_config(pattern="cla2", num_layers=2)
  params, tokens = random_params(cfg), tokens_for(cfg)
  # Silence layer 0's attention output: any gradient on the shared K/V must then come from layer 1.
  params["segment_0"]["layer_0"]["out"] = jnp.zeros_like(params["segment_0"]["layer_0"]["out"])

  def loss(p):
    return jnp.mean(apply(cfg, p, tokens)[:, -1] ** 2)

  grads = jax.grad(loss)(params)["segment_0"]["kv"]
  assert float(jnp.abs(grads["key"]).max()) > 0 and float(jnp.abs(grads["value"]).max()) > 0
  # And it is the right gradient: a central finite difference of the float64 numpy reference.
  reference = jax.device_get(params)

  def reference_loss(delta):
    bumped = jax.tree.map(np.array, reference)
    bumped["segment_0"]["kv"]["value"] = bumped["segment_0"]["kv"]["value"].astype(np.float64)
    bumped["segment_0"]["kv"]["value"][0, 3, 1, 2] += delta
    return np.mean(ref.forward(bumped, np.asarray(tokens))[:, -1] ** 2)

  numeric = (reference_loss(1e-5) - reference_loss(-1e-5)) / 2e-5
  np.testing.assert_allclose(grads["value"][0, 3, 1, 2], numeric, rtol=1e-3, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_dots", "save_qkv_ffn", "auto"])
def test_remat_changes_nothing_numerically(remat):
  cfg = small_config(pattern="keep_ends", remat="none")
  params, tokens = random_params(cfg), tokens_for(cfg)

  def loss(c):
    return lambda p: jnp.sum(apply(c, p, tokens) ** 2)

  base_loss, base_grad = jax.jit(jax.value_and_grad(loss(cfg)))(params)
  new_loss, new_grad = jax.jit(jax.value_and_grad(loss(dataclasses.replace(cfg, remat=remat))))(params)
  np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
  # Recomputation reorders fp32 sums: elements near cancellation move by a few ulps of the leaf's largest entry.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max()))),
      new_grad,
      base_grad,
  )


def _equations(jaxpr, out):
  """Every equation of `jaxpr`, recursing into sub-jaxprs (scan bodies, remat bodies, custom derivatives)."""
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _equations(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _equations(sub, out)
  return out


@pytest.mark.fast_case("save_qkv_ffn-policy3-True")
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize(
    "remat,policy",
    [
        ("none", None),
        ("full", jax.checkpoint_policies.nothing_saveable),
        ("save_dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
        ("save_qkv_ffn", model_lib.REMAT_POLICIES["save_qkv_ffn"]),
    ],
)
def test_remat_puts_each_layer_and_kv_block_in_a_checkpoint_with_its_policy(remat, policy, scan_layers):
  """Numbers alone pass when remat is silently ignored: the traced gradient must hold the checkpoints."""
  cfg = small_config(pattern="keep_ends", remat=remat, scan_layers=scan_layers)  # 7 layers: groups 1, 1, 2, 2, 1
  params = random_params(dataclasses.replace(cfg, scan_layers=True))
  if not scan_layers:
    params = model_lib.unstack_params(params, cfg)
  tokens = tokens_for(cfg)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(apply(cfg, p, tokens) ** 2)))(params)
  checkpoints = [e for e in _equations(jaxpr.jaxpr, []) if e.primitive.name in ("checkpoint", "remat2")]
  # Scanned, each segment (groups of 1, 1 | 2, 2 | 1) traces its group once: a KV block and 1, 2, 1 layers;
  # unrolled, each of the 5 groups has its KV block and each of the 7 layers is traced.
  expected = 0 if remat == "none" else (7 if scan_layers else 12)
  assert len(checkpoints) == expected
  assert all(e.params["policy"] is policy for e in checkpoints)
  # Each traced layer's backward starts behind a barrier with its output's gradient and ends behind one that
  # releases its input's gradient only with its weights' (4 layers traced scanned, 7 unrolled).
  barriers = [e for e in _equations(jaxpr.jaxpr, []) if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 2 * (4 if scan_layers else 7)
  weights = 7  # query, out, gate, up, down and the two norm scales
  # The end releases the gradients of x, of every weight, of K and of V together; the start holds the
  # gradient and the layer's inputs that its backward reads (under remat: x, weights, K, V and the 2 RoPE
  # tables, its recomputation's start), not the gradient alone.
  ends = [e for e in barriers if len(e.invars) == 1 + weights + 2]
  starts = [e for e in barriers if e not in ends]
  assert len(starts) == len(ends) == len(barriers) // 2, [len(e.invars) for e in barriers]
  assert all(len(e.invars) == (1 + 1 + weights + 2 + 2 if policy else 7) for e in starts)


def test_auto_remat_is_save_qkv_ffn_for_a_scanned_stack_on_cpu_only():
  assert jax.default_backend() == "cpu"
  assert small_config(remat="auto").resolved_remat == "save_qkv_ffn"
  assert small_config(remat="auto", scan_layers=False).resolved_remat == "none"  # nothing is stacked
  assert small_config(remat="full").resolved_remat == "full"


def test_save_qkv_ffn_names_residuals_the_model_tags():
  """The policy saves by name: a renamed checkpoint_name in the model would silently make it `full`."""
  cfg = small_config(pattern="cla2", remat="save_qkv_ffn")
  jaxpr = jax.make_jaxpr(lambda p: apply(cfg, p, tokens_for(cfg)))(random_params(cfg))
  names = {e.params["name"] for e in _equations(jaxpr.jaxpr, []) if e.primitive.name == "name"}
  assert set(model_lib.SAVED_QKV_FFN) <= names, sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_folded_attention_equals_the_library(kv_heads, packed, blocks):
  """The CPU path against `jax.nn.dot_product_attention` (XLA): outputs and all three gradients."""
  rng = np.random.default_rng(kv_heads * 10 + blocks)
  b, t, n, h = 3, 12, 4, 8
  query = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
  key, value = (jnp.asarray(rng.standard_normal((b, t, kv_heads, h), np.float32)) for _ in range(2))
  segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1)) if packed else None
  weights = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))

  def folded(q, k, v):
    return attention.folded_attention(q, k, v, segment_ids, blocks)

  def library(q, k, v):
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  np.testing.assert_allclose(folded(query, key, value), library(query, key, value), atol=2e-6)

  def grads(attend):
    return jax.grad(lambda *a: jnp.sum(attend(*a) * weights), argnums=(0, 1, 2))(query, key, value)

  for got, want in zip(grads(folded), grads(library)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_cpu_model_attends_with_folded_heads_and_matches_the_library_path():
  cfg = small_config(pattern="cla2")
  assert cfg.resolved_attention_impl == "folded"
  params, tokens = random_params(cfg), tokens_for(cfg)
  library = apply(dataclasses.replace(cfg, attention_impl="xla"), params, tokens)
  np.testing.assert_allclose(apply(cfg, params, tokens), library, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = small_config(pattern="cla2", dtype="bfloat16")
  params, tokens = random_params(cfg), tokens_for(cfg)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  logits = apply(cfg, params, tokens)
  assert logits.dtype == jnp.float32
  expected = ref.forward(jax.device_get(params), np.asarray(tokens))
  assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()


def test_bf16_compute_keeps_norms_softmax_and_the_head_in_fp32():
  """The paper's recipe, read from the traced program: a lost fp32 upcast (norm, softmax or head) only moves
  the bf16 logits' error against float64 from 3% to 5% of the largest logit, inside any tolerance bf16 passes."""
  cfg = small_config(pattern="cla2", dtype="bfloat16")
  jaxpr = jax.make_jaxpr(Transformer(cfg).apply)({"params": random_params(cfg)}, tokens_for(cfg)).jaxpr
  eqns = _equations(jaxpr, [])
  dtypes = lambda names: {str(e.outvars[0].aval.dtype) for e in eqns if e.primitive.name in names}  # noqa: E731
  assert dtypes(("rsqrt",)) == {"float32"}  # every norm
  assert dtypes(("exp", "reduce_max", "reduce_sum")) == {"float32"}  # every softmax
  dots = [str(e.outvars[0].aval.dtype) for e in eqns if e.primitive.name == "dot_general"]
  assert "bfloat16" in dots and dots[-1] == "float32"  # bf16 matmuls, but the head accumulates in fp32


def test_every_param_has_logical_axis_names():
  cfg = small_config(pattern="keep_ends")
  boxed = model_lib.abstract_params(cfg)
  allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim and set(box.names) <= allowed
  scanned = [b for b in leaves if b.names[0] == "layers"]
  assert scanned and all(b.value.ndim >= 2 for b in scanned)


def test_init_std_matches_paper():
  cfg = small_config(d_model=256, mlp_dim=512, vocab_size=512, num_layers=1, pattern="none")
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0))
  assert abs(float(jnp.std(params["segment_0"]["layer_0"]["gate"])) - 0.01275) < 5e-4
  assert float(jnp.mean(params["segment_0"]["layer_0"]["attn_norm"]["scale"])) == 1.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_heads=4, num_kv_heads=3), "not divisible by model.num_kv_heads"),
        (dict(num_layers=0), "model.num_layers must be a positive integer"),
        (dict(pattern="cla5x"), "unknown model.pattern"),
        (dict(pattern="2,2"), "covers 4 layers"),
        (dict(head_dim=7), "must be even"),
        (dict(remat="some"), "model.remat"),
    ],
)
def test_impossible_configs_fail_before_tracing(overrides, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_config({**dataclasses.asdict(small_config()), **overrides})


def test_unknown_model_field_is_rejected():
  with pytest.raises(ConfigError, match="unknown model field"):
    ModelConfig.from_config({**dataclasses.asdict(small_config()), "num_layer": 3})


def test_default_config_takes_its_model_section_from_model_config():
  """One home for model defaults: a value typed into configs/default.py (or a field missing there) fails here."""
  config = config_lib.load("configs/default.py")
  assert config.model.to_dict() == dataclasses.asdict(ModelConfig())
  assert config_lib.model_config(config) == ModelConfig()
