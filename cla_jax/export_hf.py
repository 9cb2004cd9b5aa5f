"""Exports a cla_jax workdir as a Hugging Face model directory (the inverse of `convert_hf`).

    cla-export-hf --workdir=DIR --out=HF_DIR [--step=N] [--dtype=bfloat16|float32] [--overwrite]

A model with no KV sharing whose KV norms equal its attention norms (e.g. an imported Llama) is written as a
plain `LlamaForCausalLM`. Any other model is written with this package's `configuration_cla.py` and
`modeling_cla.py` (a Llama-style decoder whose KV cache holds one entry per layer group), loaded with
`AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)`. See docs/export_hf.md.

The weight mapping is the table in cla_jax/hf_layout.py, shared with `convert_hf`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np

from cla_jax import hf_layout, paths, patterns
from cla_jax import model as model_lib
from cla_jax.errors import UserError

DTYPES = ("bfloat16", "float32")
# Above this many bytes of weights, model.safetensors is split into shards plus an index (transformers' layout).
MAX_SHARD_BYTES = 5 * 1024**3
MODELING_DIR = pathlib.Path(__file__).resolve().parent / "hf"
MODELING_FILES = ("configuration_cla.py", "modeling_cla.py")
TOKENIZER_FILE = "tokenization_cla.py"  # shipped with every sentencepiece tokenizer
INDEX_FILE = "model.safetensors.index.json"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


class ExportError(UserError):
  """A workdir or output directory that cannot be exported; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- weights


def _per_group(params: dict, cfg: model_lib.ModelConfig) -> list[dict]:
  """Each group's params (kv, layer_0, ...) in layer order, from the scanned or the unscanned layout."""
  flat = model_lib.unstack_params(params, cfg) if cfg.scan_layers else params
  return [flat[model_lib.group_name(s, g)] for s, (_, count) in enumerate(cfg.segments) for g in range(count)]


def is_plain_llama(params: dict, cfg: model_lib.ModelConfig) -> bool:
  """Whether `LlamaForCausalLM` computes this model: no sharing, each KV norm equal to its layer's attention norm.

  Llama computes a layer's K/V from `input_layernorm`; cla_jax gives each group its own KV norm, which an
  imported Llama starts equal to it but training moves apart. transformers' LlamaConfig also requires
  hidden_size to be a multiple of num_attention_heads.
  """
  if any(size != 1 for size in cfg.group_sizes) or cfg.d_model % cfg.num_heads:
    return False
  return all(
      np.array_equal(group["kv"]["norm"]["scale"], group["layer_0"]["attn_norm"]["scale"])
      for group in _per_group(jax.tree.map(np.asarray, params), cfg)
  )


def hf_tensors(params: dict, cfg: model_lib.ModelConfig, llama: bool) -> dict[str, np.ndarray]:
  """The float32 tensors of the export under Hugging Face names and layouts (KV norms only when not `llama`)."""
  params = jax.tree.map(np.asarray, params)
  top = (hf_layout.EMBED, hf_layout.FINAL_NORM) + (() if cfg.tie_embeddings else (hf_layout.LM_HEAD,))
  tensors = {t.hf_name: hf_layout.to_hf(t, hf_layout.get(params, t)) for t in top}
  kv_tensors = hf_layout.KV + (() if llama else (hf_layout.KV_NORM,))
  for layers, group in zip(patterns.layer_groups(cfg.group_sizes), _per_group(params, cfg)):
    for j, i in enumerate(layers):
      p = hf_layout.layer_prefix(i)
      tensors.update(
          {p + t.hf_name: hf_layout.to_hf(t, hf_layout.get(group[f"layer_{j}"], t)) for t in hf_layout.LAYER}
      )
      if j == 0:  # the group's K/V live with its first layer
        tensors.update({p + t.hf_name: hf_layout.to_hf(t, hf_layout.get(group["kv"], t)) for t in kv_tensors})
  return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in tensors.items()}


def write_safetensors(
    tensors: dict[str, np.ndarray], out: pathlib.Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
  """Writes model.safetensors, or shards plus model.safetensors.index.json above `max_shard_bytes`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  cast = {name: t.astype(np_dtype) for name, t in tensors.items()}
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(cast):
    if shards[-1] and size + cast[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = cast[name]
    size += cast[name].nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors files without a framework format
  if len(shards) == 1:
    save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for filename, shard in zip(names, shards):
    save_file(shard, str(out / filename), metadata=metadata)
    weight_map.update(dict.fromkeys(shard, filename))
  index = {"metadata": {"total_size": sum(t.nbytes for t in cast.values())}, "weight_map": weight_map}
  (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return names


# ----------------------------------------------------------------------------- config and tokenizer


def hf_config(
    cfg: model_lib.ModelConfig, llama: bool, dtype: str, max_positions: int, special: dict[str, int | None]
) -> dict[str, Any]:
  """config.json: a LlamaConfig, or a CLAConfig with explicit group sizes and `auto_map` to the remote code."""
  config = {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      # transformers 4.x reads only the top-level field (and would silently use 10000); 5.x reads either.
      "rope_theta": cfg.rope_theta,
      "max_position_embeddings": max_positions,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std,
      "use_cache": True,
      "dtype": dtype,
      **special,
  }
  if llama:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        **config,
    }
  return {
      "architectures": ["CLAForCausalLM"],
      "model_type": "cla",
      "auto_map": {"AutoConfig": "configuration_cla.CLAConfig", "AutoModelForCausalLM": "modeling_cla.CLAForCausalLM"},
      "kv_group_sizes": list(cfg.group_sizes),
      "cla_pattern": cfg.pattern,
      **config,
  }


def _tokenizer_json_without_specials(path: pathlib.Path, out: pathlib.Path) -> None:
  """Copies a tokenizer.json, dropping a post-processor that adds tokens (BOS/EOS): cla_jax trains without them."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  try:
    tok = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises a bare Exception
    raise ExportError(f"{path} is not a Hugging Face tokenizer.json ({str(e).strip()[:120]}).") from None
  probe = "The cat sat.\n  x = 42"
  if tok.encode(probe, add_special_tokens=True).ids != tok.encode(probe, add_special_tokens=False).ids:
    # transformers encodes with add_special_tokens=True by default; the model never saw those tokens.
    tok.post_processor = None
    tok.save(str(out / "tokenizer.json"))
  else:
    shutil.copyfile(path, out / "tokenizer.json")


def write_tokenizer(path: pathlib.Path, out: pathlib.Path) -> dict[str, int | None]:
  """Writes the tokenizer so that transformers' AutoTokenizer gives cla_jax's ids; returns bos/eos/pad ids.

  A tokenizer.json is copied (the `tokenizers` library is what cla_jax encodes with). A sentencepiece model
  is shipped with `tokenization_cla.py`, a tokenizer class that calls sentencepiece itself (remote code, like
  the CLA model): any translation into a tokenizer.json can break sentencepiece's ties differently.
  """
  if path.suffix == ".json":
    _tokenizer_json_without_specials(path, out)
    import tokenizers  # pylint: disable=g-import-not-at-top

    vocab = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    # No unk_token here: transformers would make it an added token and split text at its spelling ("[UNK]").
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    eos_id = vocab.get(eos) if eos else None
  else:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    try:
      sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
      raise ExportError(
          f"{path} is not a sentencepiece model; give the workdir the tokenizer it was trained with."
      ) from None
    shutil.copyfile(path, out / "tokenizer.model")
    shutil.copyfile(MODELING_DIR / TOKENIZER_FILE, out / TOKENIZER_FILE)
    eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    eos = sp.id_to_piece(eos_id) if eos_id is not None else None
    tok_config = {
        "tokenizer_class": "CLATokenizer",
        "auto_map": {"AutoTokenizer": [f"{TOKENIZER_FILE[:-3]}.CLATokenizer", None]},
        "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
    }
  # cla_jax adds no BOS/EOS when encoding, and neither does this config.
  tok_config.update(
      eos_token=eos,
      add_bos_token=False,
      add_eos_token=False,
      clean_up_tokenization_spaces=False,
      model_max_length=1_000_000_000,
  )
  (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
  return {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None}


# ----------------------------------------------------------------------------- export


def _check_out(workdir: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  if out.exists() and not out.is_dir():
    raise ExportError(f"--out={out} is a file; pass a new or empty directory.")
  paths.check_output_dir(out, "--out")  # before the slow restore, not as EROFS from the first write
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(f"--out={out} exists and is not empty; pass a new directory or --overwrite to replace it.")
  resolved_out, resolved_work = out.resolve(), workdir.resolve()
  if resolved_out == resolved_work or resolved_out in resolved_work.parents or resolved_work in resolved_out.parents:
    raise ExportError(f"--out={out} overlaps --workdir={workdir}; export to a directory outside the workdir.")


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
  """Writes workdir's newest (or `step`'s) params as a Hugging Face model directory `out`; returns a summary."""
  from cla_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top  (orbax is slow to import)

  if dtype not in DTYPES:
    raise ExportError(f"--dtype={dtype!r} is not one of {DTYPES}.")
  workdir_arg = os.fspath(workdir)  # as given: workdir.open also reads gs:// workdirs
  workdir, out = pathlib.Path(workdir), pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
  _check_out(workdir, out, overwrite)
  opened = workdir_lib.open(workdir_arg, step=step, mesh=None)  # replicated: the export reads every array whole
  params, config, restored_step, cfg = opened.params, opened.config, opened.step, opened.model_config
  if cfg.norm != "rmsnorm":
    raise ExportError(
        f"model.norm={cfg.norm!r} cannot be exported: Llama and the CLA modeling file use RMSNorm "
        "(no bias); only rmsnorm models export."
    )
  params = jax.tree.map(np.asarray, params)
  llama = is_plain_llama(params, cfg)
  tensors = hf_tensors(params, cfg, llama)

  # Written next to `out` and renamed into place, so a failed export never leaves half a directory.
  tmp = out.with_name(out.name + ".export-tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    files = write_safetensors(tensors, tmp, dtype, max_shard_bytes)
    tokenizer = workdir_lib.tokenizer_file(workdir, config)
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer:
      special = write_tokenizer(tokenizer, tmp)
    max_positions = int(config.train.seq_len)
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, llama, dtype, max_positions, special), indent=2) + "\n")
    generation = {
        "bos_token_id": special["bos_token_id"],
        "eos_token_id": special["eos_token_id"],
        "pad_token_id": special["pad_token_id"],
        "do_sample": False,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if not llama:
      for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, tmp / name)
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {
      "out": str(out),
      "step": restored_step,
      "format": "llama" if llama else "cla",
      "groups": patterns.layer_groups(cfg.group_sizes),
      "dtype": dtype,
      "weight_files": files,
      "tokenizer": str(tokenizer) if tokenizer else None,
      "reason": _format_reason(cfg, llama),
  }


def _format_reason(cfg: model_lib.ModelConfig, llama: bool) -> str:
  if llama:
    return "no KV sharing and KV norms equal to the attention norms: a plain LlamaForCausalLM"
  if any(size != 1 for size in cfg.group_sizes):
    return f"KV groups {list(cfg.group_sizes)}: CLA remote code (trust_remote_code=True)"
  if cfg.d_model % cfg.num_heads:
    return "d_model is not a multiple of num_heads (LlamaConfig requires it): CLA remote code"
  return "the KV norms differ from the attention norms (trained separately): CLA remote code"


def describe_export(summary: dict) -> Iterator[str]:
  """Human-readable lines summarising an export."""
  yield f"step {summary['step']} -> {summary['out']} ({summary['format']}, {summary['dtype']}): {summary['reason']}"
  yield f"weights: {', '.join(summary['weight_files'])}"
  if summary["tokenizer"]:
    yield f"tokenizer: {summary['tokenizer']}"
  else:
    yield "warning: no tokenizer found in the workdir (tokenizer.model/tokenizer.json) or data.tokenizer; none written"
