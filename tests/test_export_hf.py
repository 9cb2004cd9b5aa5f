"""Hugging Face export: logits and cached generation in transformers, the CLA cache size, round trip, errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cla_jax  # noqa: E402
from cla_jax import convert_hf, decode, describe, export_hf  # noqa: E402
from cla_jax import model as model_lib  # noqa: E402
from cla_jax import workdir as workdir_lib  # noqa: E402
from cla_jax.errors import UserError  # noqa: E402
from tests import train_helpers  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS, D_MODEL, HEADS, HEAD_DIM, MLP, VOCAB, THETA = 6, 32, 4, 8, 48, 64, 500.0
# At 6 layers every named pattern gives different groups: none [1]*6, cla2 [2,2,2], cla3 [3,3],
# keep_ends [1,2,2,1], dense_front [1,1,3,1], dense_back [1,3,1,1].
PATTERNS = ("none", "cla2", "cla3", "keep_ends", "dense_front", "dense_back")
PROMPT, NEW_TOKENS = 8, 8
KV_HEADS = {"MHA": 4, "GQA": 2, "MQA": 1}


def _config(pattern: str, num_kv_heads: int, tie: bool = False, **model) -> ml_collections.ConfigDict:
  shape = dict(num_layers=LAYERS, d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, vocab_size=VOCAB)
  fields = dict(num_kv_heads=num_kv_heads, pattern=pattern, rope_theta=THETA, tie_embeddings=tie, **model)
  return train_helpers.tiny_config(model={**shape, **fields})


def _workdir(
    path: pathlib.Path,
    pattern: str,
    num_kv_heads: int,
    *,
    tie: bool = False,
    llama_norms: bool = False,
    seed: int = 0,
    **model,
) -> pathlib.Path:
  """A params-only workdir of random weights large enough that a mis-mapped tensor changes the logits.

  Norm scales are 1 + noise, and each KV norm differs from its layer's attention norm unless `llama_norms`
  (then they are equal, as in an imported Llama, and pattern=none exports as LlamaForCausalLM).
  """
  config = _config(pattern, num_kv_heads, tie, **model)
  cfg = model_lib.ModelConfig.from_config(config.model)
  rng = np.random.default_rng(seed)
  shapes = jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda b: b.value, model_lib.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))
  )
  flat = {}
  for key, leaf in shapes:
    name = jax.tree_util.keystr(key)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    flat[name] = 1 + 0.2 * noise if "norm" in name else 0.2 * noise
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(model_lib.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names")),
      [flat[jax.tree_util.keystr(k)] for k, _ in shapes],
  )
  if llama_norms:
    for s in range(len(cfg.segments)):
      params[f"segment_{s}"]["kv"]["norm"]["scale"] = params[f"segment_{s}"]["layer_0"]["attn_norm"]["scale"].copy()
  workdir_lib.save_params_only(path, params, config)
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


def _cache(output):
  """The KV cache of a transformers output: `cache` since transformers 5.2x, `past_key_values` before."""
  return output["cache"] if "cache" in type(output).__dataclass_fields__ else output["past_key_values"]


def _cache_bytes(cache) -> int:
  return sum(
      layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
      for layer in cache.layers
  )


@pytest.mark.slow
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
    np.testing.assert_allclose(
        out.logits.numpy(), np.asarray(loaded(tokens)), atol=1e-4, rtol=0, err_msg=f"{kind} {pattern}"
    )

    # The cache holds one entry per KV group, of exactly describe's bytes per token (fp32 here: 2x its 16-bit).
    info = describe.describe(loaded.model_config)
    cache = _cache(out)
    assert len(cache.layers) == info["kv_layers"] == len(loaded.model_config.group_sizes), pattern
    assert _cache_bytes(cache) == info["kv_bytes_per_token"] * 2 * tokens.size, pattern

    # Greedy generation with the cache == greedy full-forward decoding in cla_jax.
    prompts = tokens[:, :PROMPT]
    generated = hf_model.generate(
        torch.tensor(prompts, dtype=torch.long),
        attention_mask=torch.ones_like(torch.tensor(prompts)),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
    )
    np.testing.assert_array_equal(
        generated.sequences.numpy(), greedy_reference(loaded, prompts, NEW_TOKENS), err_msg=f"{kind} {pattern}"
    )
    # ... and == cla_jax's own KV-cached generation (which stops after an EOS, so compare up to its length).
    eos = hf_model.generation_config.eos_token_id
    ours = decode.generate(
        loaded.params,
        loaded.model_config,
        prompts.tolist(),
        max_new_tokens=NEW_TOKENS,
        eos_id=eos[0] if isinstance(eos, list) else eos,
    )
    for row, new_ids in enumerate(ours):
      assert new_ids == generated.sequences.numpy()[row, PROMPT : PROMPT + len(new_ids)].tolist(), (kind, pattern)
    assert len(_cache(generated).layers) == info["kv_layers"], pattern


@pytest.fixture(scope="module")
def keep_ends_workdir(tmp_path_factory):
  """An untied GQA keep_ends workdir, shared by the tests below."""
  return _workdir(tmp_path_factory.mktemp("keep_ends") / "work", "keep_ends", 2, seed=3)


def _restored(workdir):
  params, config, _ = workdir_lib.restore_params(workdir)
  return jax.tree.map(np.asarray, params), config


@pytest.mark.parametrize(
    "pattern,llama_norms,expected_format",
    [("keep_ends", False, "cla"), ("none", True, "llama"), ("none", False, "cla")],
)
def test_export_then_import_is_bitwise(tmp_path, keep_ends_workdir, pattern, llama_norms, expected_format):
  """export_hf (fp32, sharded) -> convert_hf gives the same params bit for bit and the same model config."""
  work = (
      keep_ends_workdir
      if pattern == "keep_ends"
      else _workdir(tmp_path / "work", pattern, 2, tie=True, llama_norms=llama_norms, seed=4)
  )
  summary = export_hf.export(work, tmp_path / "hf", dtype="float32", max_shard_bytes=20_000)
  assert summary["format"] == expected_format
  assert len(summary["weight_files"]) > 1 and (tmp_path / "hf" / export_hf.INDEX_FILE).is_file()
  report = convert_hf.convert(tmp_path / "hf", tmp_path / "back")
  assert report["dropped_kv"] == []
  before, config_before = _restored(work)
  after, config_after = _restored(tmp_path / "back")
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
  model_before, model_after = config_before.model.to_dict(), config_after.model.to_dict()
  for field in convert_hf.ARCH_FIELDS + ("pattern",):
    assert model_before[field] == model_after[field], field


def test_sharded_bf16_export_loads_and_its_cache_is_describes_bytes(tmp_path, keep_ends_workdir):
  """The default bf16 export, sharded: logits close to cla_jax's, and a bf16 cache of kv_bytes_per_token x tokens."""
  summary = export_hf.export(keep_ends_workdir, tmp_path / "hf", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "hf" / export_hf.INDEX_FILE).read_text())
  assert sorted(set(index["weight_map"].values())) == summary["weight_files"]
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["kv_group_sizes"] == [1, 2, 2, 1]
  hf_model = _hf_model(tmp_path / "hf", dtype=torch.bfloat16)
  tokens = _tokens()
  with torch.no_grad():
    out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=True)
  loaded = cla_jax.load_model(keep_ends_workdir)
  info = describe.describe(loaded.model_config)
  assert len(_cache(out).layers) == 4 and _cache(out).layers[0].keys.dtype == torch.bfloat16
  assert _cache_bytes(_cache(out)) == info["kv_bytes_per_token"] * tokens.size
  expected = np.asarray(loaded(tokens))
  assert np.abs(out.logits.float().numpy() - expected).max() < 0.1 * np.abs(expected).max()


def _word_tokenizer(path: pathlib.Path, words: list[str], bos: bool = False) -> None:
  """A word-level tokenizer.json; with `bos`, its post-processor prepends <s> (as Llama-3's does)."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {"[UNK]": 0, "</s>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["</s>", "<s>"])
  if bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
  tok.save(str(path))


def real_text_sample() -> list[str]:
  """Whole documents as they come: this repo's docs and Python sources, plus the hard cases spelled out.

  Markdown tables, reST-like rule lines (long runs of one character, where segmentations tie), indentation,
  blank lines, tabs, non-ASCII and characters outside any small vocabulary (byte fallback or unk).
  """
  import textwrap  # pylint: disable=g-import-not-at-top

  docs = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
  sources = sorted((REPO_ROOT / "cla_jax").glob("*.py"))[:12]
  texts = [p.read_text(encoding="utf-8") for p in docs + sources]
  texts.append(pathlib.Path(textwrap.__file__).read_text(encoding="utf-8"))
  texts.append(
      "Heading\n=======\n\nSub\n^^^^^^^^^^^^^^^^^^^^^^^^^\n\n\tdef f(x):\n\t\treturn x  # tab-indented\n"
      "  caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600 \u2192 \u2264 end.\n\n\n"
      "----------------------------------------------------------------------\n"
      "+++++++++++++++++++++++++++++++++\n   trailing spaces   \n"
  )
  return texts


@pytest.mark.slow
def test_tokenizers_export_and_encode_like_cla_jax(tmp_path, keep_ends_workdir):
  """AutoTokenizer on an export gives cla_jax's ids and text on whole real documents, for every tokenizer kind.

  The kinds: the default recipe's sentencepiece (byte fallback, 2048 pieces), a small one without byte fallback
  (unknown characters), a sentencepiece model with Llama's dummy-prefix normaliser (not trained by cla_jax), a
  tokenizer.json, and a tokenizer.json whose post-processor adds BOS (the export drops it: cla_jax adds none).
  """
  import io  # pylint: disable=g-import-not-at-top

  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  from cla_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  sample = real_text_sample()
  assert sum(len(t) for t in sample) > 200_000
  train_text, test_text = sample[1::2], sample
  files = {}
  for name, vocab in (("spm_default", 2048), ("spm_small", 200)):
    files[name] = tmp_path / name / "tokenizer.model"
    files[name].parent.mkdir()
    files[name].write_bytes(tokenizer_lib.train_sentencepiece(train_text, vocab_size=vocab))
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(" ".join(train_text).split("\n")),
      model_writer=writer,
      vocab_size=300,
      hard_vocab_limit=False,
      minloglevel=2,
  )
  files["spm_dummy_prefix"] = tmp_path / "spm_dummy_prefix" / "tokenizer.model"
  files["spm_dummy_prefix"].parent.mkdir()
  files["spm_dummy_prefix"].write_bytes(writer.getvalue())
  words = sorted(set(" ".join(train_text).split()))[:500]
  for name, bos in (("json", False), ("json_bos", True)):
    files[name] = tmp_path / name / "tokenizer.json"
    files[name].parent.mkdir()
    _word_tokenizer(files[name], words, bos=bos)

  for name, path in files.items():
    config = ml_collections.ConfigDict(workdir_lib.read_config(keep_ends_workdir).to_dict())
    config.data.tokenizer = str(path)
    ours = tokenizer_lib.get_tokenizer(config)
    work = tmp_path / f"work_{name}"
    work.mkdir()
    (work / "checkpoints").symlink_to(keep_ends_workdir / "checkpoints", target_is_directory=True)
    workdir_lib.write_config(work, config)
    summary = export_hf.export(work, tmp_path / f"hf_{name}")
    assert summary["tokenizer"] == str(path), name
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / f"hf_{name}"), trust_remote_code=True)
    for i, text in enumerate(test_text):
      ids = ours.encode(text)
      assert theirs(text)["input_ids"] == ids, (name, i)
      assert theirs.decode(ids) == ours.decode(ids), (name, i)
    batch = theirs(test_text[:3])["input_ids"]
    assert batch == [ours.encode(t) for t in test_text[:3]], name
    assert theirs.eos_token_id == ours.eos_id, name
    generation = json.loads((tmp_path / f"hf_{name}" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id, name
    # convert_hf takes the tokenizer back: the workdir's copy encodes like the original.
    report = convert_hf.convert(tmp_path / f"hf_{name}", tmp_path / f"back_{name}")
    back = tokenizer_lib.get_tokenizer(workdir_lib.read_config(tmp_path / f"back_{name}"))
    assert report["tokenizer"].startswith(str((tmp_path / f"back_{name}").resolve())), name
    assert back.encode(test_text[0]) == ours.encode(test_text[0]), name


def test_errors_are_one_clear_line(tmp_path, keep_ends_workdir):
  out = tmp_path / "hf"
  with pytest.raises(UserError, match="does not exist"):
    export_hf.export(tmp_path / "nowhere", out)
  with pytest.raises(UserError, match="no checkpoint for step 7"):
    export_hf.export(keep_ends_workdir, out, step=7)
  with pytest.raises(UserError, match="dtype"):
    export_hf.export(keep_ends_workdir, out, dtype="float16")
  with pytest.raises(UserError, match="overlaps"):
    export_hf.export(keep_ends_workdir, keep_ends_workdir / "hf", overwrite=True)
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty.*--overwrite"):
    export_hf.export(keep_ends_workdir, out)
  assert (out / "keep.txt").read_text() == "mine"
  export_hf.export(keep_ends_workdir, out, overwrite=True)
  assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
  layernorm = _workdir(tmp_path / "layernorm", "cla2", 1, norm="layernorm")
  with pytest.raises(UserError, match="model.norm='layernorm' cannot be exported"):
    export_hf.export(layernorm, tmp_path / "hf_layernorm")
  assert not (tmp_path / "hf_layernorm").exists()
  with pytest.raises(UserError, match="omit --pattern"):
    convert_hf.convert(out, tmp_path / "back", pattern="cla2")
  corrupt = tmp_path / "corrupt_tokenizer"
  shutil.copytree(keep_ends_workdir, corrupt)
  (corrupt / "tokenizer.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(UserError, match="tokenizer.model is not a sentencepiece model"):
    export_hf.export(corrupt, tmp_path / "hf_corrupt")
  assert not (tmp_path / "hf_corrupt").exists()


@pytest.mark.slow
def test_cli_writes_and_refuses_in_one_line(tmp_path, keep_ends_workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [
      sys.executable,
      "-m",
      "cla_jax.cli.export_hf",
      f"--workdir={keep_ends_workdir}",
      f"--out={tmp_path / 'hf'}",
  ]
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "cla" in result.stdout and (tmp_path / "hf" / "modeling_cla.py").is_file()
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.startswith("error:") and "--overwrite" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_left_padded_batch_generates_like_cla_jax(tmp_path, keep_ends_workdir):
  """Batched generate with left padding (attention_mask zeros) gives cla_jax's greedy tokens for each ragged prompt."""
  export_hf.export(keep_ends_workdir, tmp_path / "hf", dtype="float32")
  hf_model = _hf_model(tmp_path / "hf")
  long, short = _tokens(1, PROMPT, seed=5)[0], _tokens(1, PROMPT - 3, seed=6)[0]
  batch = torch.tensor(np.stack([long, np.concatenate([np.zeros(3, np.int32), short])]), dtype=torch.long)
  mask = torch.ones_like(batch)
  mask[1, :3] = 0
  padded = hf_model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
  loaded = cla_jax.load_model(keep_ends_workdir)
  ours = decode.generate(loaded.params, loaded.model_config, [long.tolist(), short.tolist()], max_new_tokens=NEW_TOKENS)
  for row, (prompt, new_ids) in enumerate(zip((long, short), ours)):
    assert len(new_ids) == NEW_TOKENS  # no EOS in this tokenizer-less model
    np.testing.assert_array_equal(padded[row, -NEW_TOKENS:].numpy(), new_ids)
    # ... and the full-forward reference (no cache at all) agrees with both.
    np.testing.assert_array_equal(greedy_reference(loaded, prompt[None], NEW_TOKENS)[0, -NEW_TOKENS:], new_ids)


@pytest.mark.slow
def test_unscanned_workdir_exports_the_same_model(tmp_path):
  """model.scan_layers=False workdirs (params per group, not stacked) export too."""
  work = _workdir(tmp_path / "work", "cla3", 2, seed=7, scan_layers=False)
  export_hf.export(work, tmp_path / "hf", dtype="float32")
  tokens = _tokens()
  with torch.no_grad():
    logits = _hf_model(tmp_path / "hf")(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, np.asarray(cla_jax.load_model(work)(tokens)), atol=1e-4, rtol=0)
