"""Distillation from a frozen teacher during training (uptraining a converted CLA model; docs/convert_hf.md).

With `train.teacher` set, the train step minimises

    (1 - w) * CE(student, next token) + w * T^2 * KL(teacher_T || student_T)

per target token, where p_T = softmax(logits / T), w = `train.distill_weight` and T =
`train.distill_temperature` (the T^2 keeps the KL gradient's scale independent of T, as in Hinton et al.).
The teacher is a workdir or a Hugging Face directory with the same tokenizer; its params are placed on the
student's mesh with the same rule table, run in the same jitted step under stop_gradient, in bf16 on
accelerators, never updated and never saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cla_jax import model as model_lib
from cla_jax import sharding
from cla_jax import workdir as workdir_lib
from cla_jax.errors import UserError

Batch = dict[str, jax.Array]
# Encoded by both tokenizers: a teacher whose ids differ on it predicts another vocabulary.
_PROBE = (
    "The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 3.14, naïve café, 東京\n"
    "import os; print(os.path.join('a', 'b')) -- Unicode: ü, ß, é; numbers 12345 67890."
)


class DistillError(UserError):
  """A teacher or distillation setting that cannot work; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model on the training mesh: its module, params (sharded like the student's) and the loss mix."""

  model: nn.Module
  params: Any
  param_shardings: Any
  weight: float
  temperature: float
  source: str


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises DistillError for a bad distillation weight or temperature (checked even without a teacher)."""
  t = config.train
  weight, temperature = t.distill_weight, t.distill_temperature
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # noqa: E731
  if not number(weight) or not 0 <= weight <= 1:
    raise DistillError(
        f"train.distill_weight must be in [0, 1] (the KL's share of the loss; 0: LM loss only), got {weight!r}."
    )
  if not number(temperature) or not 0 < temperature < float("inf"):
    raise DistillError(
        f"train.distill_temperature must be a number > 0 (1: the plain distribution), got {temperature!r}."
    )
  if not isinstance(t.teacher, str):
    raise DistillError(f"train.teacher must be a path (a workdir or Hugging Face dir) or '', got {t.teacher!r}.")


def _teacher_kind(path: pathlib.Path) -> str:
  """'hf' (config.json with a model_type) or 'workdir' (config.json + checkpoints/), else DistillError."""
  if not path.exists():
    raise DistillError(f"train.teacher={str(path)!r} does not exist; pass a trained workdir or a Hugging Face dir.")
  config_file = path / workdir_lib.CONFIG_FILE  # a Hugging Face model directory has one too
  if path.is_dir() and config_file.is_file():
    try:
      fields = json.loads(config_file.read_text())
    except json.JSONDecodeError:
      fields = {}
    if isinstance(fields, dict) and "model_type" in fields:
      return "hf"
    if (path / workdir_lib.CHECKPOINT_DIR).is_dir():
      return "workdir"
  raise DistillError(
      f"train.teacher={str(path)!r} is neither a cla_jax workdir (config.json + checkpoints/) nor a Hugging Face "
      f"model directory (config.json + *.safetensors)."
  )


def _tokenizer_file(path: pathlib.Path, config: ml_collections.ConfigDict | None) -> Any:
  """The teacher's tokenizer (its directory's tokenizer.model / tokenizer.json, else its config's), or None."""
  from cla_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  found = workdir_lib.tokenizer_file(path)
  if found is not None:
    return tokenizer_lib.from_file_bytes(found.read_bytes(), str(found))
  if config is not None and os.path.isfile(os.path.expanduser(str(config.data.tokenizer))):
    return tokenizer_lib.get_tokenizer(config)
  return None


def check_same_tokenizer(student: Any, teacher: Any, source: str) -> None:
  """Raises DistillError unless both tokenizers have one vocabulary and encode a probe text identically."""
  if teacher is None:
    raise DistillError(
        f"train.teacher={source!r} has no tokenizer (tokenizer.model / tokenizer.json) to check against the "
        f"student's; add the one it was trained with."
    )
  if student.file_bytes() == teacher.file_bytes():
    return
  if student.vocab_size != teacher.vocab_size or student.encode(_PROBE) != teacher.encode(_PROBE):
    raise DistillError(
        f"train.teacher={source!r} uses another tokenizer ({teacher.description}: {teacher.vocab_size} tokens) "
        f"than the student ({student.description}: {student.vocab_size} tokens); distil from a teacher with "
        f"the student's tokenizer (set data.tokenizer to the teacher's file)."
    )


def _teacher_model_config(model_fields: dict) -> model_lib.ModelConfig:
  # The teacher is only run forward: compute in bf16 on accelerators (dtype auto) and never remat.
  fields = dict(model_fields, dtype="auto", remat="none", attention_impl="auto")
  return model_lib.ModelConfig.from_config(fields)


def load_teacher(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, student: model_lib.ModelConfig, tokenizer: Any
) -> Teacher | None:
  """The teacher named by `train.teacher` on `mesh`, checked against the student; None when it is ''."""
  check_config(config)
  source = str(config.train.teacher)
  if not source:
    return None
  path = pathlib.Path(os.path.expanduser(source)).resolve()
  kind = _teacher_kind(path)
  if kind == "hf":
    from cla_jax import convert_hf  # pylint: disable=g-import-not-at-top  (safetensors; only for an HF teacher)

    hf = convert_hf.read_hf_config(path)
    arch = convert_hf.parse_llama_config(hf)
    pattern = "none" if arch.kv_group_sizes is None else convert_hf.cla_pattern(hf, arch, "none")
    cfg = _teacher_model_config(convert_hf.build_config(arch, pattern).model.to_dict())
    teacher_tokenizer = _tokenizer_file(path, None)
  else:
    teacher_config = workdir_lib.read_config(path)
    cfg = _teacher_model_config(teacher_config.model.to_dict())
    teacher_tokenizer = _tokenizer_file(path, teacher_config)
  if cfg.vocab_size != student.vocab_size:
    raise DistillError(
        f"train.teacher={source!r} has vocab_size {cfg.vocab_size} but the student has {student.vocab_size}; "
        f"distil from a teacher with the student's vocabulary."
    )
  check_same_tokenizer(tokenizer, teacher_tokenizer, source)
  sharding.check_model_fits(cfg, mesh)
  shardings = sharding.logical_shardings(model_lib.abstract_params(cfg), mesh)
  if kind == "hf":
    with contextlib.ExitStack() as stack:
      params, _ = convert_hf.convert_params(convert_hf.SafetensorsReader(path, stack), arch, cfg)
    params = jax.device_put(params, shardings)
  else:
    params, _, _ = workdir_lib.restore_params(path, mesh=mesh)
  return Teacher(
      model_lib.Transformer(cfg),
      params,
      shardings,
      float(config.train.distill_weight),
      float(config.train.distill_temperature),
      str(path),
  )


def kl_to_teacher(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """Per-token KL(softmax(teacher / T) || softmax(student / T)) [...], fp32."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def objective(
    params: Any, batch: Batch, *, model: nn.Module, teacher: Teacher, teacher_params: Any
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
  """(summed mixed loss, (weighted token count, summed {distill_lm_loss, distill_kl})), for train_step."""

  def logits_of(module, p):
    return sharding.apply(
        module, p, batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )

  student = logits_of(model, params).astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(logits_of(teacher.model, jax.lax.stop_gradient(teacher_params)))
  weights = batch["weights"].astype(jnp.float32)
  lm = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(student, batch["targets"]) * weights)
  kl = jnp.sum(kl_to_teacher(student, teacher_logits, teacher.temperature) * weights)
  t, w = teacher.temperature, teacher.weight
  total = (1.0 - w) * lm + w * t * t * kl
  return total, (jnp.sum(weights), {"distill_lm_loss": lm, "distill_kl": kl})
