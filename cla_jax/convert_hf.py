"""Imports a Hugging Face `LlamaForCausalLM` checkpoint as a CLA workdir.

    cla-convert-hf --hf_dir=DIR --workdir=OUT [--pattern=cla2] [...]     (the command: cla_jax/cli/convert_hf.py)

With `--pattern=none` (the default) the converted model computes the same function as the original.
With sharing, each KV group keeps the K/V projections of its first layer and initialises its KV norm
from that layer's pre-attention norm (`input_layernorm`); the other layers' K/V weights are dropped
and listed in OUT/convert_report.json. See docs/convert_hf.md.

The weight mapping is the table in cla_jax/hf_layout.py, shared with `export_hf`; a Llama layer's
`input_layernorm` also starts its group's KV norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import ml_collections
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype, which safetensors needs for BF16 tensors)
import numpy as np
from safetensors import safe_open

from cla_jax import config_lib, hf_layout, patterns
from cla_jax import kv_init as kv_init_lib
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.errors import UserError

ROPE_LAYOUTS = ("half", "interleaved")
# Buffers some older exports saved next to the weights; recomputed from rope_theta, so safe to skip.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Model fields that come from the checkpoint; the rest of config.model (dtype, remat, ...) stays the user's.
ARCH_FIELDS = (
    "num_layers",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "vocab_size",
    "norm",
    "norm_eps",
    "rope_theta",
    "tie_embeddings",
)


class ConvertError(UserError):
  """A checkpoint that cannot be converted; the message names the field or tensor at fault."""


@dataclasses.dataclass(frozen=True)
class LlamaArch:
  """The architecture fields of a Llama `config.json`, validated and in cla_jax's terms."""

  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  norm_eps: float
  rope_theta: float
  tie_embeddings: bool
  max_position_embeddings: int | None = None
  # An exported CLA model's (model_type='cla', written by cla_jax.export_hf) KV group sizes; None for Llama.
  kv_group_sizes: tuple[int, ...] | None = None

  def model_fields(self) -> dict[str, Any]:
    """The `config.model` fields this architecture fixes."""
    fields = {name: getattr(self, name) for name in ARCH_FIELDS if name != "norm"}
    return dict(fields, norm="rmsnorm")


# ----------------------------------------------------------------------------- config.json


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
  """The parsed `config.json` of a Hugging Face model directory."""
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConvertError(
        f"{path} not found; --hf_dir must be a Hugging Face model directory "
        "(config.json + *.safetensors), e.g. the output of save_pretrained()."
    )
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{path} is not valid JSON ({e}).") from None


def _rope_theta_and_type(hf: Mapping[str, Any]) -> tuple[float, str]:
  # transformers >= 5 nests RoPE settings in `rope_parameters`; older files use `rope_theta`/`rope_scaling`.
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  return float(theta), rope_type


def parse_llama_config(hf: Mapping[str, Any]) -> LlamaArch:
  """Validates a Llama `config.json` dict; raises ConvertError naming the unsupported field."""
  architectures = hf.get("architectures") or []
  if hf.get("model_type") == "cla":
    return _parse_cla_config(hf)
  if hf.get("model_type") != "llama":
    raise ConvertError(
        f"config.json model_type={hf.get('model_type')!r} is not supported; only Llama "
        "(model_type='llama', LlamaForCausalLM) checkpoints can be converted."
    )
  if architectures and "LlamaForCausalLM" not in architectures:
    raise ConvertError(
        f"config.json architectures={architectures} is not supported; "
        "only LlamaForCausalLM checkpoints can be converted."
    )
  theta, rope_type = _rope_theta_and_type(hf)
  if rope_type != "default":
    raise ConvertError(
        f"config.json rope type {rope_type!r} (rope_parameters/rope_scaling) is not supported; "
        "only the default RoPE (no scaling, e.g. not Llama 3.1's 'llama3') can be converted."
    )
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field, False):
      raise ConvertError(f"config.json {field}=true is not supported: cla_jax projections have no biases.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConvertError(
        f"config.json hidden_act={hf.get('hidden_act')!r} is not supported; "
        "cla_jax's MLP is SwiGLU (hidden_act='silu')."
    )
  for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
    if not isinstance(hf.get(field), int) or hf[field] <= 0:
      raise ConvertError(f"config.json {field}={hf.get(field)!r} must be a positive integer.")
  num_heads = hf["num_attention_heads"]
  num_kv_heads = hf.get("num_key_value_heads") or num_heads
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  if num_heads % num_kv_heads:
    raise ConvertError(
        f"config.json num_attention_heads={num_heads} is not divisible by " f"num_key_value_heads={num_kv_heads}."
    )
  return LlamaArch(
      num_layers=hf["num_hidden_layers"],
      d_model=hf["hidden_size"],
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      mlp_dim=hf["intermediate_size"],
      vocab_size=hf["vocab_size"],
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings"),
  )


def _parse_cla_config(hf: Mapping[str, Any]) -> LlamaArch:
  """A CLA `config.json` (cla_jax.export_hf): Llama's fields plus `kv_group_sizes`."""
  if (hf.get("architectures") or ["CLAForCausalLM"]) != ["CLAForCausalLM"]:
    raise ConvertError(
        f"config.json architectures={hf.get('architectures')} is not supported for model_type='cla'; "
        "expected ['CLAForCausalLM'] (a cla_jax.export_hf export)."
    )
  arch = parse_llama_config(dict(hf, model_type="llama", architectures=["LlamaForCausalLM"]))
  sizes = hf.get("kv_group_sizes")
  if (
      not isinstance(sizes, list)
      or not all(isinstance(s, int) and s > 0 for s in sizes)
      or sum(sizes) != arch.num_layers
  ):
    raise ConvertError(
        f"config.json kv_group_sizes={sizes!r} must be positive integers summing to "
        f"num_hidden_layers={arch.num_layers}."
    )
  return dataclasses.replace(arch, kv_group_sizes=tuple(sizes))


def cla_pattern(hf: Mapping[str, Any], arch: LlamaArch, pattern: str) -> str:
  """The pattern to import an exported CLA model with: its own groups (`pattern` may only restate them)."""
  sizes = arch.kv_group_sizes
  named = str(hf.get("cla_pattern") or "")
  own = named if named and _sizes_or_none(named, arch.num_layers) == sizes else ",".join(map(str, sizes))
  if pattern == "none" and own != "none":  # the default: keep the checkpoint's grouping
    return own
  if has_per_layer_kv(arch):  # no sharing yet (e.g. a cla_jax pattern=none model): any pattern applies
    return pattern
  if _sizes_or_none(pattern, arch.num_layers) != sizes:
    raise ConvertError(
        f"--pattern={pattern!r} differs from the exported CLA model's KV groups {list(sizes)} "
        f"(pattern {own!r}); omit --pattern: an exported CLA model keeps its grouping."
    )
  return pattern


def has_per_layer_kv(arch: LlamaArch) -> bool:
  """True when every layer has its own K/V (a Llama, or an exported CLA model without sharing)."""
  return arch.kv_group_sizes is None or all(size == 1 for size in arch.kv_group_sizes)


def _sizes_or_none(pattern: str, num_layers: int) -> tuple[int, ...] | None:
  try:
    return patterns.group_sizes(pattern, num_layers)
  except patterns.PatternError:
    return None


# ----------------------------------------------------------------------------- safetensors


class SafetensorsReader:
  """Lazy, name-addressed access to a (possibly sharded) safetensors checkpoint, as float32 numpy."""

  def __init__(self, hf_dir: str | pathlib.Path, stack: contextlib.ExitStack):
    hf_dir = pathlib.Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not weight_map:
        raise ConvertError(f"{index} has no 'weight_map'; re-save the model with save_pretrained().")
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
      raise ConvertError(
          f"no *.safetensors files in {hf_dir}; re-save the model with "
          "save_pretrained(..., safe_serialization=True) (PyTorch .bin files are not read)."
      )
    self._handles: dict[str, Any] = {}
    self.dtypes: set[str] = set()
    for name in files:
      if not (hf_dir / name).is_file():
        raise ConvertError(f"{hf_dir / name} (listed in model.safetensors.index.json) is missing.")
      try:
        handle = stack.enter_context(safe_open(str(hf_dir / name), framework="np"))
      except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own error types)
        raise ConvertError(
            f"{hf_dir / name} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            f"it may be truncated: download or save it again."
        ) from None
      for key in handle.keys():
        self._handles[key] = handle

  @property
  def names(self) -> list[str]:
    return sorted(self._handles)

  def __contains__(self, name: str) -> bool:
    return name in self._handles

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[name].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32 (bf16/fp16 checkpoints are upcast exactly)."""
    if name not in self._handles:
      raise ConvertError(f"tensor {name!r} is missing from the checkpoint; is this a LlamaForCausalLM export?")
    dtype = self._handles[name].get_slice(name).get_dtype()  # safetensors' names: F32, BF16, F16, I32, U8, ...
    if not dtype.startswith(("F", "BF")):
      # Integer or bool weights are not a model's weights (a quantized or damaged file): never cast them silently.
      raise ConvertError(
          f"tensor {name!r} has dtype {dtype}, not a floating point type; convert a float (F32/BF16/F16) "
          "checkpoint, not a quantized or damaged one."
      )
    self.dtypes.add(dtype)
    try:
      tensor = np.asarray(self._handles[name].get_tensor(name), dtype=np.float32)
    except Exception as e:  # pylint: disable=broad-except
      raise ConvertError(
          f"tensor {name!r} cannot be read ({str(e).splitlines()[0][:120]}); the safetensors file "
          f"may be truncated: download or save it again."
      ) from None
    if not np.isfinite(tensor).all():
      raise ConvertError(
          f"tensor {name!r} holds {int((~np.isfinite(tensor)).sum())} NaN/inf values; the checkpoint "
          f"is damaged (or was saved from a diverged run): use another one."
      )
    return tensor


# ----------------------------------------------------------------------------- weights


def interleaved_to_half(w: np.ndarray) -> np.ndarray:
  """Reorders the head_dim (last) axis of a Q/K weight from interleaved RoPE pairs to rotate-half pairs.

  Meta's original Llama weights rotate pairs (2i, 2i+1) of each head; cla_jax (like Hugging Face) rotates
  pairs (i, i + h/2). Output feature i takes input feature 2i and i + h/2 takes 2i + 1, so
  `rope_half(x @ interleaved_to_half(W)) == rope_interleaved(x @ W)[..., perm]` and q.k scores are unchanged.
  """
  *lead, head_dim = w.shape
  return w.reshape(*lead, head_dim // 2, 2).swapaxes(-1, -2).reshape(*lead, head_dim)


def _check_shape(reader: SafetensorsReader, name: str, shape: tuple[int, ...], field: str) -> None:
  """Raises ConvertError, naming the config.json fields involved, unless tensor `name` has `shape`."""
  if name not in reader:
    raise ConvertError(f"tensor {name!r} is missing from the checkpoint; is this a LlamaForCausalLM export?")
  actual = reader.shape(name)
  if actual != shape:
    raise ConvertError(
        f"tensor {name!r} has shape {list(actual)} but config.json ({field}) implies "
        f"{list(shape)}; fix config.json or the checkpoint."
    )


def _read(reader: SafetensorsReader, prefix: str, tensor: hf_layout.Tensor, sizes: dict[str, int]) -> np.ndarray:
  """Tensor `prefix + tensor.hf_name`, shape-checked, in cla_jax's layout."""
  name = prefix + tensor.hf_name
  _check_shape(reader, name, hf_layout.hf_shape(tensor, sizes), tensor.fields)
  return hf_layout.from_hf(tensor, reader.get(name), sizes)


def _layer_tensors(
    reader: SafetensorsReader, arch: LlamaArch, i: int, rope_layout: str, with_kv: bool
) -> tuple[dict, dict | None]:
  """(layer params, kv params or None) of HF layer i in cla_jax's layout."""
  sizes, p = hf_layout.dims(arch), hf_layout.layer_prefix(i)
  layer: dict[str, Any] = {}
  for t in hf_layout.LAYER:
    hf_layout.put(layer, t, _read(reader, p, t, sizes))
  if rope_layout == "interleaved":
    layer["query"] = interleaved_to_half(layer["query"])
  if not with_kv and not has_per_layer_kv(arch):
    return layer, None  # a shared exported CLA model's non-first layers have no K/V
  if not with_kv:
    # Dropped, but still shape-checked so that a malformed file never converts silently.
    for t in hf_layout.KV:
      _check_shape(reader, p + t.hf_name, hf_layout.hf_shape(t, sizes), t.fields)
    return layer, None
  kv: dict[str, Any] = {}
  for t in hf_layout.KV:
    hf_layout.put(kv, t, _read(reader, p, t, sizes))
  if rope_layout == "interleaved":
    kv["key"] = interleaved_to_half(kv["key"])  # values are not rotated, so they keep their layout
  if arch.kv_group_sizes is not None:  # an exported CLA model keeps each group's own KV norm
    hf_layout.put(kv, hf_layout.KV_NORM, _read(reader, p, hf_layout.KV_NORM, sizes))
  else:  # a Llama layer computes its K/V from its attention norm
    kv["norm"] = {"scale": layer["attn_norm"]["scale"].copy()}
  return layer, kv


def _check_unused(reader: SafetensorsReader, arch: LlamaArch) -> None:
  """Rejects tensors the mapping does not know (biases, extra modules) rather than silently dropping them."""
  known = {t.hf_name for t in (hf_layout.EMBED, hf_layout.FINAL_NORM, hf_layout.LM_HEAD)}
  producers = set(range(arch.num_layers))
  kv_tensors = hf_layout.KV
  if arch.kv_group_sizes is not None:
    producers = {layers[0] for layers in patterns.layer_groups(arch.kv_group_sizes)}
    kv_tensors += (hf_layout.KV_NORM,)
  for i in range(arch.num_layers):
    p = hf_layout.layer_prefix(i)
    known.update(p + t.hf_name for t in hf_layout.LAYER)
    if i in producers:
      known.update(p + t.hf_name for t in kv_tensors)
  unknown = [n for n in reader.names if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
  if unknown:
    more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
    raise ConvertError(
        f"checkpoint tensor(s) {unknown[:3]}{more} have no place in a cla_jax Llama "
        "(biases? more layers than config.json num_hidden_layers?); they are not supported."
    )


def convert_params(
    reader: SafetensorsReader,
    arch: LlamaArch,
    cfg: model_lib.ModelConfig,
    rope_layout: str = "half",
    kv_init: str = "first",
    layer_inputs: list[np.ndarray] | None = None,
) -> tuple[dict, dict]:
  """(scanned params as float32 numpy, report of dropped K/V) for the CLA model `cfg`.

  `kv_init` picks how a shared group's K/V block is built from its layers' (cla_jax.kv_init);
  `layer_inputs` (the original model's residual stream entering each layer on a calibration batch,
  kv_init.layer_inputs) is needed by 'lsq' and, when given, adds each group's K/V errors to the report.
  """
  check_kv_init(kv_init, arch, calibrated=layer_inputs is not None)
  if rope_layout not in ROPE_LAYOUTS:
    raise ConvertError(
        f"rope_layout={rope_layout!r} is not one of {ROPE_LAYOUTS}: 'half' for Hugging Face "
        "checkpoints, 'interleaved' for Meta-layout Q/K weights."
    )
  _check_unused(reader, arch)
  if not has_per_layer_kv(arch) and tuple(cfg.group_sizes) != arch.kv_group_sizes:
    raise ConvertError(
        f"model.pattern={cfg.pattern!r} gives KV groups {list(cfg.group_sizes)} but the exported CLA "
        f"model has {list(arch.kv_group_sizes)}; an exported CLA model keeps its grouping."
    )
  sizes = hf_layout.dims(arch)
  params: dict[str, Any] = {}
  for t in (hf_layout.EMBED, hf_layout.FINAL_NORM):
    hf_layout.put(params, t, _read(reader, "", t, sizes))
  ignored = [n for n in reader.names if n.endswith(_IGNORED_SUFFIXES)]
  if arch.tie_embeddings and "lm_head.weight" in reader:
    ignored.append("lm_head.weight")  # transformers also ties it to the embedding on load, ignoring the file's
  if not arch.tie_embeddings:
    if "lm_head.weight" not in reader:
      raise ConvertError(
          "tensor 'lm_head.weight' is missing but config.json tie_word_embeddings is false; "
          "set tie_word_embeddings=true if the head shares the embedding."
      )
    hf_layout.put(params, hf_layout.LM_HEAD, _read(reader, "", hf_layout.LM_HEAD, sizes))

  groups = patterns.layer_groups(cfg.group_sizes)
  dropped = []
  # Group names of the unscanned layout, in layer order; model.stack_params stacks them per segment.
  group_names = [
      model_lib.group_name(s, g) for s, (_, num_groups) in enumerate(cfg.segments) for g in range(num_groups)
  ]
  kv_errors = []
  for layers, group_name in zip(groups, group_names):
    group = {}
    # Every layer's K/V is read when the group's block is built from all of them or its error is measured.
    read_all = has_per_layer_kv(arch) and (kv_init != "first" or layer_inputs is not None)
    originals = []
    for j, i in enumerate(layers):
      layer, kv = _layer_tensors(reader, arch, i, rope_layout, with_kv=(j == 0 or read_all))
      group[f"layer_{j}"] = layer
      if kv is not None:
        originals.append(kv)
      if j > 0 and has_per_layer_kv(arch):  # a shared exported CLA model has no K/V here to drop
        names = [hf_layout.layer_prefix(i) + t.hf_name for t in hf_layout.KV]
        dropped.append({"layer": i, "kv_from_layer": layers[0], "tensors": names})
    inputs = None if layer_inputs is None or not read_all else [layer_inputs[i] for i in layers]
    group["kv"], errors = kv_init_lib.init_group(originals, kv_init, arch.norm_eps, inputs)
    if errors is not None:
      kv_errors.append(
          {
              "layers": layers,
              "key": [round(e["key"], 6) for e in errors],
              "value": [round(e["value"], 6) for e in errors],
          }
      )
    params[group_name] = group
  params = model_lib.stack_params(params, cfg)
  kv_size = 2 * arch.d_model * arch.num_kv_heads * arch.head_dim
  report = {
      "pattern": cfg.pattern,
      "groups": groups,
      "kv_source_layers": [layers[0] for layers in groups],
      "dropped_kv": dropped,
      "dropped_parameters": kv_size * len(dropped),
      "kv_init": kv_init,
      # Per group and layer: ||shared K - layer's own K||_F / ||layer's own K||_F (and V) on the calibration batch.
      "kv_relative_errors": kv_errors if layer_inputs is not None else None,
      "rope_layout": rope_layout,
      "ignored_tensors": ignored,
  }
  return params, report


def check_kv_init(kv_init: str, arch: LlamaArch, calibrated: bool) -> None:
  """Raises ConvertError for an unknown init, one that needs a calibration batch without one, or a CLA export."""
  if kv_init not in kv_init_lib.KV_INITS:
    raise ConvertError(f"--kv_init={kv_init!r} is not one of {kv_init_lib.KV_INITS}; see docs/convert_hf.md.")
  if kv_init in kv_init_lib.NEEDS_CALIBRATION and not calibrated:
    raise ConvertError(
        f"--kv_init={kv_init} fits the K/V on a calibration batch; set --calib_sequences to a positive count."
    )
  if kv_init != "first" and not has_per_layer_kv(arch):
    raise ConvertError(
        f"--kv_init={kv_init}: an exported CLA model already has one K/V per group; omit --kv_init (or pass first)."
    )


def check_against_model(params: dict, cfg: model_lib.ModelConfig) -> None:
  """Raises ConvertError if the converted tree differs (paths or shapes) from what `Transformer(cfg)` declares."""
  from cla_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax is slow to import)

  diff = checkpoint.shape_differences(params, nn.meta.unbox(model_lib.abstract_params(cfg)))
  if diff:
    raise ConvertError(f"converted params do not match the model (param: got -> expected): {'; '.join(diff[:3])}.")


# ----------------------------------------------------------------------------- workdir


def build_config(
    arch: LlamaArch, pattern: str, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """`base` (default: configs/default.py) with the model architecture taken from the checkpoint."""
  if base is None:
    base = config_lib.load(config_lib.DEFAULT_CONFIG)
  config = ml_collections.ConfigDict(base.to_dict())  # a private, unlocked copy
  config.model.update(arch.model_fields())
  config.model.pattern = pattern
  config.data.pad_vocab = False  # the checkpoint fixes the embedding size; padding would change it
  model_lib.ModelConfig.from_config(config.model)  # fails early, naming the field, e.g. a bad pattern
  return config


def convert(
    hf_dir: str | pathlib.Path,
    workdir: str | pathlib.Path,
    *,
    pattern: str = "none",
    config: ml_collections.ConfigDict | None = None,
    rope_layout: str = "half",
    kv_init: str = "first",
    calib_tokens: np.ndarray | None = None,
) -> dict:
  """Converts `hf_dir` into a params-only CLA workdir; returns the report also written to DIR/convert_report.json.

  `kv_init` builds each shared group's K/V block (cla_jax.kv_init); `calib_tokens` [b, t] (e.g.
  `calibration_tokens(...)`) is the batch 'lsq' fits on and the report's K/V errors are measured on.
  """
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  ckpt_dir = workdir / workdir_lib.CHECKPOINT_DIR
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise ConvertError(f"{workdir} already holds checkpoints; pass an empty or new --workdir.")
  hf = read_hf_config(hf_dir)
  arch = parse_llama_config(hf)
  if arch.kv_group_sizes is not None:
    pattern = cla_pattern(hf, arch, pattern)
  config = build_config(arch, pattern, config)
  cfg = model_lib.ModelConfig.from_config(config.model)
  check_kv_init(kv_init, arch, calibrated=calib_tokens is not None)
  with contextlib.ExitStack() as stack:
    reader = SafetensorsReader(hf_dir, stack)
    inputs = None
    if calib_tokens is not None and has_per_layer_kv(arch) and any(n > 1 for n in cfg.group_sizes):
      inputs = original_layer_inputs(reader, arch, rope_layout, calib_tokens)
    params, report = convert_params(reader, arch, cfg, rope_layout, kv_init, inputs)
    source_dtypes = sorted(reader.dtypes)
  check_against_model(params, cfg)

  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = _checkpoint_tokenizer(hf_dir)
  if tokenizer:
    # A copy keeps the workdir self-contained; the config points at the copy.
    shutil.copyfile(tokenizer, workdir / tokenizer.name)
    config.data.tokenizer = str((workdir / tokenizer.name).resolve())
  config.lock()
  workdir_lib.save_params_only(str(workdir), params, config, step=0)

  report = dict(
      report,
      hf_dir=str(hf_dir.resolve()),
      source_dtypes=source_dtypes,
      num_layers=arch.num_layers,
      tokenizer=config.data.tokenizer,
      max_position_embeddings=arch.max_position_embeddings,
      calibration_tokens=None if inputs is None else list(np.shape(calib_tokens)),
  )
  (workdir / workdir_lib.CONVERT_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
  return report


def _checkpoint_tokenizer(hf_dir: pathlib.Path) -> pathlib.Path | None:
  """The checkpoint's tokenizer file: tokenizer.json, else a sentencepiece tokenizer.model (cla_jax's exports)."""
  # Hugging Face's Llama directories ship both; tokenizer.json is what transformers itself reads.
  return workdir_lib.tokenizer_file(hf_dir, names=tuple(reversed(workdir_lib.TOKENIZER_FILES)))


def original_layer_inputs(
    reader: SafetensorsReader, arch: LlamaArch, rope_layout: str, tokens: np.ndarray
) -> list[np.ndarray]:
  """The unconverted model's residual stream entering each layer on `tokens` (kv_init.layer_inputs)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
    raise ConvertError(f"calibration tokens must be a non-empty int array [batch, length], got {tokens.shape}.")
  if tokens.min() < 0 or tokens.max() >= arch.vocab_size:
    raise ConvertError(
        f"calibration token ids span [{tokens.min()}, {tokens.max()}] but the model's vocab_size is "
        f"{arch.vocab_size}; calibrate with the checkpoint's own tokenizer (--config.data.tokenizer)."
    )
  cfg = model_lib.ModelConfig.from_config(build_config(arch, "none").model)
  params, _ = convert_params(reader, arch, cfg, rope_layout)
  return kv_init_lib.layer_inputs(params, cfg, tokens)


def calibration_tokens(hf_dir: str | pathlib.Path, config: ml_collections.ConfigDict, sequences: int) -> np.ndarray:
  """The first `sequences` rows of training batch 0 of `config`'s data, tokenized with the checkpoint's tokenizer.

  The training split, not validation: the K/V fit must not see the text the converted model is judged on.
  """
  from cla_jax.data import batches as batches_lib  # pylint: disable=g-import-not-at-top  (data stack is heavy)
  from cla_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from cla_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config.to_dict())
  tokenizer_file = _checkpoint_tokenizer(pathlib.Path(hf_dir))
  if tokenizer_file and config.data.tokenizer == "sentencepiece":
    config.data.tokenizer = str(tokenizer_file.resolve())
  tokenizer = tokenizer_lib.get_tokenizer(config)
  data = prepare.open_split(config, tokenizer, "train", config.train.seq_len)
  batches = batches_lib.TrainBatches(data, sequences, config.data, tokenizer.eos_id, process_index=0, process_count=1)
  return np.asarray(batches.batch(0)["inputs"], np.int32)


def describe_report(report: dict) -> Iterator[str]:
  """Human-readable lines summarising a conversion."""
  yield f"pattern {report['pattern']}: KV groups {report['groups']}"
  if report["dropped_kv"]:
    layers = [d["layer"] for d in report["dropped_kv"]]
    yield (
        f"dropped K/V projections of layers {layers} ({report['dropped_parameters']:,} parameters); "
        f"their groups use the K/V of layers {report['kv_source_layers']}"
    )
  else:
    yield "no K/V weights dropped: the converted model computes the same function as the original"
  for group in report.get("kv_relative_errors") or []:
    if len(group["layers"]) > 1:
      errors = ", ".join(f"{k:.3f}/{v:.3f}" for k, v in zip(group["key"], group["value"]))
      yield f"group {group['layers']} ({report['kv_init']}): K/V relative error per layer {errors}"
  if report["tokenizer"].endswith(("tokenizer.json", "tokenizer.model")):
    yield f"tokenizer: {report['tokenizer']}"
  else:
    yield (
        "warning: no tokenizer.json or tokenizer.model in the checkpoint, so "
        f"data.tokenizer={report['tokenizer']!r}; the model only makes sense with its own tokenizer: pass "
        "--config.data.tokenizer=PATH (tokenizer.json or .model)."
    )
