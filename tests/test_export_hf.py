"""Hugging Face export: logits and cached generation in transformers, the CLA cache size, round trip, errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cla_jax  # noqa: E402
from cla_jax import checkpoint  # noqa: E402
from cla_jax import config_lib  # noqa: E402
from cla_jax import convert_hf  # noqa: E402
from cla_jax import describe  # noqa: E402
from cla_jax import export_hf  # noqa: E402
from cla_jax import model as model_lib  # noqa: E402
from cla_jax.errors import UserError  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS, D_MODEL, HEADS, HEAD_DIM, MLP, VOCAB, THETA = 6, 32, 4, 8, 48, 64, 500.0
# At 6 layers every named pattern gives different groups: none [1]*6, cla2 [2,2,2], cla3 [3,3],
# keep_ends [1,2,2,1], dense_front [1,1,3,1], dense_back [1,3,1,1].
PATTERNS = ("none", "cla2", "cla3", "keep_ends", "dense_front", "dense_back")
PROMPT, NEW_TOKENS = 8, 8
KV_HEADS = {"MHA": 4, "GQA": 2, "MQA": 1}


def _config(pattern: str, num_kv_heads: int, tie: bool = False, **model) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config_lib.load("configs/default.py").to_dict())
  config.model.update(num_layers=LAYERS, d_model=D_MODEL, num_heads=HEADS, num_kv_heads=num_kv_heads,
                      head_dim=HEAD_DIM, mlp_dim=MLP, vocab_size=VOCAB, pattern=pattern, rope_theta=THETA,
                      tie_embeddings=tie, dtype="float32", **model)
  return config


def _workdir(path: pathlib.Path, pattern: str, num_kv_heads: int, *, tie: bool = False, llama_norms: bool = False,
             seed: int = 0, **model) -> pathlib.Path:
  """A params-only workdir of random weights large enough that a mis-mapped tensor changes the logits.

  Norm scales are 1 + noise, and each KV norm differs from its layer's attention norm unless `llama_norms`
  (then they are equal, as in an imported Llama, and pattern=none exports as LlamaForCausalLM).
  """
  config = _config(pattern, num_kv_heads, tie, **model)
  cfg = model_lib.ModelConfig.from_config(config.model)
  rng = np.random.default_rng(seed)
  shapes = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda b: b.value, model_lib.abstract_params(cfg),
                                                            is_leaf=lambda x: hasattr(x, "names")))
  flat = {}
  for key, leaf in shapes:
    name = jax.tree_util.keystr(key)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    flat[name] = 1 + 0.2 * noise if "norm" in name else 0.2 * noise
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model_lib.abstract_params(cfg),
                                                                     is_leaf=lambda x: hasattr(x, "names")),
                                        [flat[jax.tree_util.keystr(k)] for k, _ in shapes])
  if llama_norms:
    for s in range(len(cfg.segments)):
      params[f"segment_{s}"]["kv"]["norm"]["scale"] = params[f"segment_{s}"]["layer_0"]["attn_norm"]["scale"].copy()
  checkpoint.save_params_only(path, params, config)
  return path


def _hf_model(hf_dir: pathlib.Path, dtype=torch.float32):
  return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=dtype).eval()


def _tokens(batch=2, length=PROMPT + NEW_TOKENS, seed=1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def greedy_reference(model, prompts: np.ndarray, max_new_tokens: int) -> np.ndarray:
  """Greedy decoding with full forward passes of a cla_jax model (no KV cache): prompts + new tokens.

  Every pass runs on the final length (one compiled shape): attention is causal, so the tokens after
  position t - 1 do not change its logits.
  """
  batch, length = prompts.shape
  tokens = np.zeros((batch, length + max_new_tokens), np.int32)
  tokens[:, :length] = prompts
  for t in range(length, length + max_new_tokens):
    tokens[:, t] = np.asarray(model(tokens))[:, t - 1].argmax(-1)
  return tokens


def _cache_bytes(cache) -> int:
  return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
             for layer in cache.layers)


@pytest.mark.parametrize("kind", list(KV_HEADS))
def test_every_pattern_matches_cla_jax_in_transformers(kind, tmp_path):
  """Logits, cached greedy generation and the cache (num_groups entries, describe's bytes) for each pattern."""
  tie = kind == "MQA"  # tied and untied heads both covered
  tokens = _tokens()
  for pattern in PATTERNS:
    work = _workdir(tmp_path / pattern / "work", pattern, KV_HEADS[kind], tie=tie, llama_norms=pattern == "none")
    summary = export_hf.export(work, tmp_path / pattern / "hf", dtype="float32")
    hf_config = json.loads((tmp_path / pattern / "hf" / "config.json").read_text())
    if pattern == "none":
      assert summary["format"] == "llama" and hf_config["architectures"] == ["LlamaForCausalLM"]
      assert not (tmp_path / pattern / "hf" / "modeling_cla.py").exists()
    else:
      assert summary["format"] == "cla" and hf_config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_cla")
    hf_model = _hf_model(tmp_path / pattern / "hf")
    expected_class = "LlamaForCausalLM" if pattern == "none" else "CLAForCausalLM"
    assert type(hf_model).__name__ == expected_class, pattern

    loaded = cla_jax.load_model(work)
    with torch.no_grad():
      out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=True)
    np.testing.assert_allclose(out.logits.numpy(), np.asarray(loaded(tokens)), atol=1e-4, rtol=0,
                               err_msg=f"{kind} {pattern}")

    # The cache holds one entry per KV group, of exactly describe's bytes per token (fp32 here: 2x its 16-bit).
    info = describe.describe(loaded.model_config)
    cache = out.past_key_values
    assert len(cache.layers) == info["kv_layers"] == len(loaded.model_config.group_sizes), pattern
    assert _cache_bytes(cache) == info["kv_bytes_per_token"] * 2 * tokens.size, pattern

    # Greedy generation with the cache == greedy full-forward decoding in cla_jax.
    prompts = tokens[:, :PROMPT]
    generated = hf_model.generate(torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones_like(
        torch.tensor(prompts)), max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    np.testing.assert_array_equal(generated.sequences.numpy(), greedy_reference(loaded, prompts, NEW_TOKENS),
                                  err_msg=f"{kind} {pattern}")
    assert len(generated.past_key_values.layers) == info["kv_layers"], pattern
