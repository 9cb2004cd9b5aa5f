"""Hugging Face Llama import: parity with transformers, CLA sharing recipe, errors, loader, CLI, training."""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cla_jax  # noqa: E402
from cla_jax import convert_hf  # noqa: E402
from cla_jax import workdir as workdir_lib  # noqa: E402
from cla_jax.errors import UserError  # noqa: E402
from tests import numpy_reference  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB, D_MODEL, HEADS, HEAD_DIM, LAYERS = 128, 64, 4, 16, 4
THETA, EPS = 5000.0, 1e-5


def _tiny_llama(num_kv_heads: int, tie: bool, seed: int = 0) -> "transformers.LlamaForCausalLM":
  """A random fp32 Llama with non-trivial norms, so that a mis-mapped weight changes the logits."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=D_MODEL,
      intermediate_size=96,
      num_hidden_layers=LAYERS,
      num_attention_heads=HEADS,
      num_key_value_heads=num_kv_heads,
      rope_theta=THETA,
      rms_norm_eps=EPS,
      tie_word_embeddings=tie,
      max_position_embeddings=64,
  )
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


def _save(model, path: pathlib.Path, **kwargs) -> pathlib.Path:
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  return path


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _tokens(batch=2, length=24, seed=1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _hf_weight(model, name: str) -> np.ndarray:
  return model.state_dict()[name].float().numpy()


@pytest.fixture(scope="module")
def gqa_model():
  return _tiny_llama(num_kv_heads=2, tie=False)


@pytest.fixture(scope="module")
def gqa_dir(gqa_model, tmp_path_factory):
  return _save(gqa_model, tmp_path_factory.mktemp("hf_gqa"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_kv_heads,tie,sharded", [(4, False, False), (2, True, True)], ids=["mha-untied", "gqa-tied-sharded"]
)
def test_share_factor_1_matches_transformers(tmp_path, num_kv_heads, tie, sharded):
  model = _tiny_llama(num_kv_heads, tie)
  hf_dir = _save(model, tmp_path / "hf", **({"max_shard_size": "30KB"} if sharded else {}))
  assert (hf_dir / "model.safetensors.index.json").exists() == sharded
  report = convert_hf.convert(hf_dir, tmp_path / "work", pattern="none")
  assert report["dropped_kv"] == [] and report["kv_source_layers"] == list(range(LAYERS))

  loaded = cla_jax.load_model(tmp_path / "work", dtype="float32")
  m = loaded.config.model
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size) == (
      LAYERS,
      D_MODEL,
      HEADS,
      num_kv_heads,
      HEAD_DIM,
      96,
      VOCAB,
  )
  assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.pattern) == (THETA, EPS, tie, "none")
  assert ("lm_head" in loaded.params) == (not tie)

  tokens = _tokens()
  logits = loaded(tokens)
  assert logits.dtype == np.float32 and logits.shape == (2, 24, VOCAB)
  np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_share_factor_2_keeps_first_layer_kv_and_matches_numpy(gqa_model, gqa_dir, tmp_path):
  report = convert_hf.convert(gqa_dir, tmp_path / "work", pattern="cla2")
  assert report["groups"] == [[0, 1], [2, 3]]
  assert [d["layer"] for d in report["dropped_kv"]] == [1, 3]
  assert report["dropped_parameters"] == 2 * 2 * D_MODEL * 2 * HEAD_DIM  # 2 layers x (K + V) x [d, k*h]
  assert (
      json.loads((tmp_path / "work" / workdir_lib.CONVERT_REPORT_FILE).read_text())["dropped_kv"]
      == report["dropped_kv"]
  )

  loaded = cla_jax.load_model(tmp_path / "work", dtype="float32")
  kv = loaded.params["segment_0"]["kv"]
  for g, layer in enumerate([0, 2]):  # each group's K/V and KV norm come from its first layer
    k_proj = _hf_weight(gqa_model, f"model.layers.{layer}.self_attn.k_proj.weight")
    v_proj = _hf_weight(gqa_model, f"model.layers.{layer}.self_attn.v_proj.weight")
    for head in range(2):
      rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
      np.testing.assert_array_equal(np.asarray(kv["key"][g][:, head, :]), k_proj[rows].T)
      np.testing.assert_array_equal(np.asarray(kv["value"][g][:, head, :]), v_proj[rows].T)
    np.testing.assert_array_equal(
        np.asarray(kv["norm"]["scale"][g]), _hf_weight(gqa_model, f"model.layers.{layer}.input_layernorm.weight")
    )
  second = loaded.params["segment_0"]["layer_1"]["attn_norm"]["scale"][0]  # layer 1 keeps its own norm
  np.testing.assert_array_equal(np.asarray(second), _hf_weight(gqa_model, "model.layers.1.input_layernorm.weight"))

  tokens = _tokens()
  logits = np.asarray(loaded(tokens))
  expected = numpy_reference.forward(loaded.params, tokens, eps=EPS, theta=THETA, tie_embeddings=False)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  # Sharing really changed the function (the dropped K/V mattered).
  assert np.abs(logits - _hf_logits(gqa_model, tokens)).max() > 1e-2


def test_bf16_checkpoint_is_upcast_exactly(tmp_path):
  model = _tiny_llama(num_kv_heads=2, tie=False).to(torch.bfloat16)
  hf_dir = _save(model, tmp_path / "hf")
  arch = convert_hf.parse_llama_config(convert_hf.read_hf_config(hf_dir))
  cfg = convert_hf.model_lib.ModelConfig.from_config(convert_hf.build_config(arch, "none").model)
  with contextlib.ExitStack() as stack:
    reader = convert_hf.SafetensorsReader(hf_dir, stack)
    params, _ = convert_hf.convert_params(reader, arch, cfg)
    assert reader.dtypes == {"BF16"}
  assert params["embed"].dtype == np.float32
  np.testing.assert_array_equal(params["embed"], _hf_weight(model, "model.embed_tokens.weight"))
  np.testing.assert_array_equal(params["lm_head"], _hf_weight(model, "lm_head.weight").T)
  np.testing.assert_array_equal(
      params["segment_0"]["layer_0"]["down"][3], _hf_weight(model, "model.layers.3.mlp.down_proj.weight").T
  )


def _rope_interleaved(x, positions, theta):
  """Meta's RoPE: rotates adjacent pairs (x_2i, x_2i+1) of x [t, heads, h]."""
  h = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, h, 2) / h)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * positions[:, None, None] * freqs)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def test_interleaved_to_half_preserves_rope_attention_scores():
  rng = np.random.default_rng(0)
  d, n, h, t = 8, 2, 6, 5
  w_q, w_k, x = rng.normal(size=(d, n, h)), rng.normal(size=(d, n, h)), rng.normal(size=(t, d))
  positions = np.arange(t) * 3.0
  meta_q = _rope_interleaved(np.einsum("td,dnh->tnh", x, w_q), positions, 100.0)
  meta_k = _rope_interleaved(np.einsum("td,dnh->tnh", x, w_k), positions, 100.0)
  half = lambda w: numpy_reference.rope(
      np.einsum("td,dnh->tnh", x, convert_hf.interleaved_to_half(w))[None], positions[None], 100.0
  )[0]
  half_q, half_k = half(w_q), half(w_k)
  np.testing.assert_allclose(half_q, meta_q[..., [0, 2, 4, 1, 3, 5]], atol=1e-12)
  np.testing.assert_allclose(
      np.einsum("tnh,snh->nts", half_q, half_k), np.einsum("tnh,snh->nts", meta_q, meta_k), atol=1e-10
  )


def test_rope_layout_interleaved_converts_a_meta_layout_checkpoint(gqa_model, tmp_path):
  """Q/K rows put back into Meta's interleaved order (as HF's conversion script undoes) convert to the same model."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  def to_interleaved(w, heads):  # HF rows per head: [first halves..., second halves...] -> pairs
    return w.reshape(heads, 2, HEAD_DIM // 2, D_MODEL).transpose(0, 2, 1, 3).reshape(heads * HEAD_DIM, D_MODEL)

  tensors = {k: v.float().numpy().copy() for k, v in gqa_model.state_dict().items()}
  for i in range(LAYERS):
    for proj, heads in (("q_proj", HEADS), ("k_proj", 2)):
      name = f"model.layers.{i}.self_attn.{proj}.weight"
      tensors[name] = np.ascontiguousarray(to_interleaved(tensors[name], heads))
  hf_dir = tmp_path / "meta"
  hf_dir.mkdir()
  save_file(tensors, str(hf_dir / "model.safetensors"))
  (hf_dir / "config.json").write_text(gqa_model.config.to_json_string())

  tokens = _tokens(1, 12)
  expected = _hf_logits(gqa_model, tokens)
  arch = convert_hf.parse_llama_config(convert_hf.read_hf_config(hf_dir))
  cfg = convert_hf.model_lib.ModelConfig.from_config(convert_hf.build_config(arch, "none").model)
  for layout, matches in (("interleaved", True), ("half", False)):
    with contextlib.ExitStack() as stack:
      params, _ = convert_hf.convert_params(convert_hf.SafetensorsReader(hf_dir, stack), arch, cfg, layout)
    logits = numpy_reference.forward(params, tokens, eps=EPS, theta=THETA)
    assert (np.abs(logits - expected).max() <= 1e-4) == matches, layout


def _edit_config(src: pathlib.Path, dst: pathlib.Path, **changes) -> pathlib.Path:
  shutil.copytree(src, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(changes)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "rope"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 8}, "head_dim"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"intermediate_size": 128}, "intermediate_size"),
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ],
)
def test_unsupported_or_mismatched_checkpoints_name_the_field(gqa_dir, tmp_path, changes, field):
  hf_dir = _edit_config(gqa_dir, tmp_path / "hf", **changes)
  with pytest.raises(UserError, match=field):
    convert_hf.convert(hf_dir, tmp_path / "work")
  assert not (tmp_path / "work" / "checkpoints").exists()


def test_missing_inputs_are_clear_errors(gqa_dir, tmp_path):
  with pytest.raises(UserError, match="config.json"):
    convert_hf.convert(tmp_path / "nowhere", tmp_path / "work")
  hf_dir = tmp_path / "hf"
  shutil.copytree(gqa_dir, hf_dir)
  (hf_dir / "model.safetensors").unlink()
  with pytest.raises(UserError, match="safetensors"):
    convert_hf.convert(hf_dir, tmp_path / "work")
  with pytest.raises(UserError, match="pattern"):
    convert_hf.convert(gqa_dir, tmp_path / "work", pattern="cla9x")
  tied_dir = _save(_tiny_llama(num_kv_heads=2, tie=True), tmp_path / "tied")
  _edit_config(tied_dir, tmp_path / "untied", tie_word_embeddings=False)
  with pytest.raises(UserError, match="lm_head.*tie_word_embeddings"):
    convert_hf.convert(tmp_path / "untied", tmp_path / "work")


def test_load_model_rejects_bad_tokens(gqa_dir, tmp_path):
  convert_hf.convert(gqa_dir, tmp_path / "work")
  loaded = cla_jax.load_model(tmp_path / "work")
  assert loaded.step == 0 and loaded.config.model.vocab_size == VOCAB
  with pytest.raises(UserError, match="2-D"):
    loaded(np.zeros((5,), np.int32))
  with pytest.raises(UserError, match="integers"):
    loaded(np.zeros((1, 5), np.float32))
  with pytest.raises(UserError, match=r"\[0, 128\)"):
    loaded(np.full((1, 5), VOCAB, np.int32))
  with pytest.raises(UserError, match="positions must be >= 0"):
    loaded([[1, 2, 3]], positions=[[-1, 0, 1]])
  assert loaded([[1, 2, 3]]).shape == (1, 3, VOCAB)
  # The same checks on jax arrays (concrete values: one small reduction on the device).
  with pytest.raises(UserError, match=r"\[0, 128\), got range \[0, 128\]"):
    loaded(jnp.array([[0, 5, VOCAB]], jnp.int32))
  with pytest.raises(UserError, match=r"got range \[-1, 5\]"):
    loaded(jnp.array([[-1, 5]], jnp.int32))
  with pytest.raises(UserError, match="positions must be >= 0, got a minimum of -2"):
    loaded(jnp.array([[1, 2, 3]]), positions=jnp.array([[-2, 0, 1]]))
  good = jnp.array([[1, 2, 3]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(loaded(good)), np.asarray(loaded(np.asarray(good))))
  # Under the caller's own jit the values are unknown: not checked (documented in LoadedModel.__call__).
  assert jax.jit(loaded)(good).shape == (1, 3, VOCAB)
  with pytest.raises(UserError, match="no checkpoint for step 7"):
    cla_jax.load_model(tmp_path / "work", step=7)


def _word_tokenizer(path: pathlib.Path, text: str) -> None:
  """A tiny word-level HF tokenizer.json covering `text`, with an end-of-text token."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  words = sorted(set(text.split()))
  vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["</s>"])
  tok.save(str(path))


@pytest.fixture(scope="module")
def cli_workdir(gqa_model, tmp_path_factory):
  """`python -m cla_jax.cli.convert_hf --pattern=cla2` on a checkpoint with a tokenizer.json."""
  root = tmp_path_factory.mktemp("cli")
  hf_dir = _save(gqa_model, root / "hf")
  text = " ".join(f"word{i % 40} alpha beta gamma delta" for i in range(400))
  _word_tokenizer(hf_dir / "tokenizer.json", text)
  (root / "data").mkdir()
  for i in range(4):
    (root / "data" / f"doc{i}.txt").write_text(text[i * 300 :] + "\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "cla_jax.cli.convert_hf",
          f"--hf_dir={hf_dir}",
          f"--workdir={root / 'work'}",
          "--pattern=cla2",
          "--kv_init=lsq",
          "--calib_sequences=4",
          "--config.train.lr=1e-4",
          "--config.train.seq_len=16",
          "--config.data.source=text",
          f"--config.data.text_glob={root / 'data' / '*.txt'}",
          "--config.data.eval_fraction=0.25",
          f"--config.data.data_dir={root / 'cache'}",
      ],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr
  return root, result.stdout


@pytest.mark.slow
def test_cli_reports_dropped_kv_and_references_tokenizer(cli_workdir):
  root, stdout = cli_workdir
  assert "dropped K/V projections of layers [1, 3]" in stdout
  assert "group [0, 1] (lsq): K/V relative error per layer" in stdout
  report = json.loads((root / "work" / workdir_lib.CONVERT_REPORT_FILE).read_text())
  assert report["kv_init"] == "lsq" and report["calibration_tokens"] == [4, 16]
  assert [g["layers"] for g in report["kv_relative_errors"]] == [[0, 1], [2, 3]]
  config = json.loads((root / "work" / "config.json").read_text())
  assert config["model"]["pattern"] == "cla2" and config["train"]["lr"] == 1e-4
  assert config["data"]["tokenizer"] == str((root / "work" / "tokenizer.json").resolve())
  assert (root / "work" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()


def _convert_cli(*flags: str) -> subprocess.CompletedProcess:
  """`python -m cla_jax.cli.convert_hf FLAGS` on CPU, output captured."""
  return subprocess.run(
      [sys.executable, "-m", "cla_jax.cli.convert_hf", *flags],
      cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.slow
def test_cli_error_is_one_line(gqa_dir, tmp_path):
  result = _convert_cli(f"--hf_dir={gqa_dir}", f"--workdir={tmp_path / 'w'}", "--pattern=bogus")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error:") and "pattern" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_continued_training_from_converted_workdir(cli_workdir):
  from cla_jax import trainer  # pylint: disable=g-import-not-at-top

  root, _ = cli_workdir
  workdir = root / "work"
  before, config, step = workdir_lib.restore_params(workdir)
  assert step == 0
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.update(
      source="text", text_glob=str(root / "data" / "*.txt"), eval_fraction=0.25, data_dir=str(root / "cache")
  )
  config.train.update(steps=2, batch_size=8, seq_len=16, log_every=1, eval_every=0, lr=1e-3)
  config.checkpoint.update(every_steps=2, async_save=False)
  config.lock()
  trainer.run(config, str(workdir))
  after, _, step = workdir_lib.restore_params(workdir)
  assert step == 2
  moved = np.abs(np.asarray(after["embed"]) - np.asarray(before["embed"])).max()
  assert 0 < moved < 0.1  # started from the converted weights (init_std-scale noise would differ far more)
  kv_before = np.asarray(before["segment_0"]["kv"]["key"])
  kv_after = np.asarray(after["segment_0"]["kv"]["key"])
  assert np.abs(kv_after - kv_before).max() < 0.1


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_a_norm_tensor_that_is_not_floating_point_is_refused(gqa_dir, tmp_path, dtype):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  damaged = tmp_path / "int_norm"
  shutil.copytree(gqa_dir, damaged)
  (weights,) = damaged.glob("*.safetensors")
  tensors = load_file(str(weights))
  tensors["model.norm.weight"] = np.ones_like(tensors["model.norm.weight"], dtype=dtype)
  save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(convert_hf.ConvertError, match=r"'model.norm.weight' has dtype (I32|U8|BOOL), not a floating"):
    convert_hf.convert(damaged, tmp_path / "work")
  assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_truncated_safetensors_is_one_line_and_nan_weights_are_refused(gqa_dir, tmp_path):
  truncated = tmp_path / "truncated"
  shutil.copytree(gqa_dir, truncated)
  (weights,) = truncated.glob("*.safetensors")
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  result = subprocess.run(
      [sys.executable, "-m", "cla_jax.cli.convert_hf", f"--hf_dir={truncated}", f"--workdir={tmp_path / 'w1'}"],
      cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and "truncated" in result.stderr
  assert not (tmp_path / "w1").exists()

  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  damaged = tmp_path / "nan"
  shutil.copytree(gqa_dir, damaged)
  (weights,) = damaged.glob("*.safetensors")
  tensors = load_file(str(weights))
  name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
  tensors[name] = tensors[name].copy()
  tensors[name][0, 0] = np.nan
  save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(convert_hf.ConvertError, match=f"{name}.*NaN/inf"):
    convert_hf.convert(damaged, tmp_path / "w2")
  assert not (tmp_path / "w2").exists()


@pytest.mark.slow
def test_converted_workdir_continues_with_the_default_config(cli_workdir, tmp_path):
  """train.py --config=configs/default.py on a converted workdir: the model comes from its config.json."""
  from cla_jax import config_lib, trainer  # pylint: disable=g-import-not-at-top

  root, _ = cli_workdir
  workdir = tmp_path / "work"
  shutil.copytree(root / "work", workdir)
  saved = workdir_lib.read_config(workdir)
  config = config_lib.load("configs/default.py")
  assert config.model.d_model != saved.model.d_model
  config.data.update(
      source="text",
      text_glob=str(root / "data" / "*.txt"),
      eval_fraction=0.25,
      data_dir=str(root / "cache"),
      tokenizer=saved.data.tokenizer,
  )
  config.train.update(
      steps=max(2, (workdir_lib.latest_step(workdir) or 0) + 1),
      batch_size=8,
      seq_len=16,
      log_every=1,
      eval_every=0,
      lr=1e-3,
  )
  config.checkpoint.update(every_steps=100, async_save=False)
  config.model.remat = "full"  # allowed on resume: it does not change the weights
  trainer.run(config, str(workdir), explicit_model_fields=["remat"])
  resumed = workdir_lib.read_config(workdir)
  assert resumed.model.d_model == saved.model.d_model and resumed.model.remat == "full"
  config.model.d_model = saved.model.d_model * 2  # an explicit weight-changing override is refused
  with pytest.raises(trainer.TrainConfigError, match=r"different model config \(fields \['d_model'\]\)"):
    trainer.run(config, str(workdir), explicit_model_fields=["d_model"])


# ----------------------------------------------------------------------------- K/V initialisation (issue 28)


def _rms(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)


@pytest.fixture(scope="module")
def calibration(gqa_model):
  """Calibration tokens and, from transformers itself, the residual stream entering each layer on them."""
  tokens = _tokens(batch=3, length=20, seed=5)
  with torch.no_grad():
    hidden = gqa_model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
  return tokens, [h.double().numpy().reshape(-1, D_MODEL) for h in hidden[:LAYERS]]


@pytest.mark.fast_case("lsq")
@pytest.mark.parametrize("kv_init", ["first", "mean", "lsq"])
def test_kv_init_shapes_and_report_errors_match_an_independent_reference(
    gqa_model, gqa_dir, tmp_path, calibration, kv_init
):
  tokens, inputs = calibration
  report = convert_hf.convert(gqa_dir, tmp_path / "work", pattern="cla2", kv_init=kv_init, calib_tokens=tokens)
  loaded = cla_jax.load_model(tmp_path / "work", dtype="float32")
  kv = loaded.params["segment_0"]["kv"]
  assert kv["key"].shape == kv["value"].shape == (2, D_MODEL, 2, HEAD_DIM)
  assert kv["norm"]["scale"].shape == (2, D_MODEL)
  assert report["kv_init"] == kv_init and report["calibration_tokens"] == [3, 20]

  squared = 0.0  # sum over groups, layers, K and V of the absolute squared error (what lsq minimises)
  for g, layers in enumerate([[0, 1], [2, 3]]):
    gain = np.asarray(kv["norm"]["scale"][g], np.float64)
    for which, proj in (("key", "k_proj"), ("value", "v_proj")):
      shared = (_rms(inputs[layers[0]]) * gain) @ np.asarray(kv[which][g], np.float64).reshape(D_MODEL, -1)
      for j, layer in enumerate(layers):
        own_gain = _hf_weight(gqa_model, f"model.layers.{layer}.input_layernorm.weight")
        own_proj = _hf_weight(gqa_model, f"model.layers.{layer}.self_attn.{proj}.weight")
        original = (_rms(inputs[layer]) * own_gain) @ own_proj.T
        error = np.linalg.norm(shared - original) / np.linalg.norm(original)
        assert report["kv_relative_errors"][g][which][j] == pytest.approx(error, rel=1e-3, abs=1e-5), (g, which, j)
        squared += np.sum((shared - original) ** 2)
  test_kv_init_shapes_and_report_errors_match_an_independent_reference.squared[kv_init] = squared
  if kv_init == "first":  # the group's first layer keeps its own K/V exactly
    assert report["kv_relative_errors"][0]["key"][0] == 0 and report["kv_relative_errors"][1]["value"][0] == 0
  if kv_init == "lsq":  # the fit minimises the summed squared error: no worse than the other two inits
    others = test_kv_init_shapes_and_report_errors_match_an_independent_reference.squared
    assert all(squared <= others[name] * (1 + 1e-6) for name in ("first", "mean") if name in others)


test_kv_init_shapes_and_report_errors_match_an_independent_reference.squared = {}


def test_kv_init_mean_is_the_hand_computed_mean(gqa_model, gqa_dir):
  arch = convert_hf.parse_llama_config(convert_hf.read_hf_config(gqa_dir))
  cfg = convert_hf.model_lib.ModelConfig.from_config(convert_hf.build_config(arch, "cla2").model)
  with contextlib.ExitStack() as stack:
    params, report = convert_hf.convert_params(convert_hf.SafetensorsReader(gqa_dir, stack), arch, cfg, kv_init="mean")
  assert report["kv_init"] == "mean" and report["kv_relative_errors"] is None
  kv = params["segment_0"]["kv"]
  for g, layers in enumerate([[0, 1], [2, 3]]):
    for which, proj in (("key", "k_proj"), ("value", "v_proj")):
      # Each layer's map x -> (x * gain) @ W^T, i.e. gain[:, None] * W^T, averaged over the group's two layers.
      folded = [
          _hf_weight(gqa_model, f"model.layers.{i}.input_layernorm.weight")[:, None]
          * _hf_weight(gqa_model, f"model.layers.{i}.self_attn.{proj}.weight").T
          for i in layers
      ]
      expected = ((folded[0] + folded[1]) / 2).reshape(D_MODEL, 2, HEAD_DIM)
      np.testing.assert_allclose(kv[which][g], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(kv["norm"]["scale"][g], np.ones(D_MODEL, np.float32))


def test_kv_init_with_pattern_none_keeps_the_function_and_singleton_groups_are_exact(
    gqa_model, gqa_dir, tmp_path, calibration
):
  tokens, _ = calibration
  report = convert_hf.convert(gqa_dir, tmp_path / "w", pattern="1,2,1", kv_init="mean", calib_tokens=tokens)
  errors = report["kv_relative_errors"]
  assert [g["layers"] for g in errors] == [[0], [1, 2], [3]]
  assert errors[0]["key"] == [0.0] and errors[2]["value"] == [0.0]  # a one-layer group keeps its own K/V
  assert min(errors[1]["key"]) > 0


@pytest.mark.slow
def test_bad_kv_init_inputs_are_one_line_errors(gqa_dir, tmp_path, calibration):
  with pytest.raises(UserError, match="kv_init='bogus' is not one of"):
    convert_hf.convert(gqa_dir, tmp_path / "a", pattern="cla2", kv_init="bogus")
  with pytest.raises(UserError, match="calibration batch; set --calib_sequences"):
    convert_hf.convert(gqa_dir, tmp_path / "b", pattern="cla2", kv_init="lsq")
  with pytest.raises(UserError, match=r"calibration token ids span \[0, 500\]"):
    convert_hf.convert(gqa_dir, tmp_path / "c", pattern="cla2", calib_tokens=np.array([[0, 500]]))
  assert not any((tmp_path / name).exists() for name in "abc")
  for flag in ("--kv_init=bogus", "--calib_sequences=-1"):
    result = _convert_cli(f"--hf_dir={gqa_dir}", f"--workdir={tmp_path / 'w'}", "--pattern=cla2", flag)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and flag.split("=")[0].lstrip("-") in result.stderr
