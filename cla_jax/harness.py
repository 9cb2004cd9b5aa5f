"""EleutherAI's LM-Eval-Harness on a cla_jax workdir: the `cla_jax` harness model and a wrapper CLI.

    cla-harness --model_args workdir=DIR[,step=N] --tasks hellaswag,piqa [--num_fewshot K ...]

    import lm_eval, cla_jax.harness
    lm_eval.simple_evaluate(model=cla_jax.harness.CLAHarnessLM(workdir=DIR), tasks=["piqa"])

`CLAHarnessLM` answers the harness's three request types on the evaluation mesh of eval.py (batches split over
the data-parallel devices, params sharded by the rule table; every process runs every request and feeds its rows):
`loglikelihood` and `loglikelihood_rolling` score fixed-shape batches of token windows (the rolling ones are
eval.py's own `rolling_windows`), `generate_until` goes through the model's KV-cached `generate`.
lm-eval 0.4.13 has no plugin entry point for models, hence the wrapper command (cla_jax/cli/harness.py): it
imports this module, which registers the model, then hands every flag to the harness's own CLI. See docs/eval.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

try:
  import lm_eval.models  # noqa: F401  (registers the harness's own models: a registry we populate first hides them)
  from lm_eval.api.instance import Instance
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models import utils as lm_eval_utils
  from lm_eval.utils import simple_parse_args_string
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError(f"cla_jax.harness needs LM-Eval-Harness ({e}); install it with pip install -e '.[eval]'.") from e

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cla_jax import config_lib, evaluate, sharding
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.errors import UserError
from cla_jax.load import LoadedModel

DEFAULT_MAX_GEN_TOKS = 256  # the harness's HF model's default


def _row_scores(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Per row: summed log-probability of the weighted targets, and whether each of them is the argmax."""
  logits = sharding.apply(model, params, batch["inputs"]).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits)
  target = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
  scored = batch["weights"] > 0
  greedy = (jnp.argmax(logits, axis=-1) == batch["targets"]) | ~scored
  return {"log_likelihood": jnp.sum(jnp.where(scored, target, 0.0), axis=-1), "is_greedy": jnp.all(greedy, axis=-1)}


class RowScorer(evaluate.Scorer):
  """eval.py's scorer with per-row results: (log-likelihood, is-greedy) of every window in a batch."""

  def __init__(self, params: Any, config: Any, mesh: jax.sharding.Mesh):
    super().__init__(params, config, mesh)
    model = model_lib.Transformer(config_lib.model_config(config))
    self._rows = jax.jit(
        lambda p, b: _row_scores(p, b, model=model),
        in_shardings=(jax.tree.map(lambda x: x.sharding, params), sharding.batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )

  def score_rows(self, batches: Iterable[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float64 [rows], is-greedy bool [rows]) of all rows of host-local batches, in order.

    Every process feeds its rows of each batch; results are replicated, so every process gets all rows.
    """
    outputs, pending = [], None
    with jax.set_mesh(self.mesh):
      for batch in batches:
        out = self._rows(self.params, sharding.global_batch(batch, self.mesh))
        if pending is not None:
          jax.block_until_ready(pending)  # one batch in flight: the host prepares the next meanwhile
        pending = out
        outputs.append(out)
    outputs = jax.device_get(outputs)
    if not outputs:
      return np.zeros(0, np.float64), np.zeros(0, bool)
    return (
        np.concatenate([o["log_likelihood"] for o in outputs]).astype(np.float64),
        np.concatenate([o["is_greedy"] for o in outputs]),
    )


def _bucket(length: int, max_length: int) -> int:
  """Padded batch length: the next power of two (at least 16), at most max_length, so few shapes compile."""
  return min(max_length, max(16, 1 << max(0, length - 1).bit_length()))


def _int_arg(name: str, value: Any, minimum: int) -> int:
  """A model_args integer (the harness passes strings or ints), refused in one line when bad."""
  try:
    number = int(value)
    if number != float(value):
      raise ValueError
  except (TypeError, ValueError):
    raise UserError(f"model_args {name}={value!r} must be an integer.") from None
  if number < minimum:
    raise UserError(f"model_args {name}={number} must be at least {minimum}.")
  return number


@register_model("cla_jax")
class CLAHarnessLM(TemplateLM):
  """A cla_jax workdir as an LM-Eval-Harness model (`--model cla_jax --model_args workdir=DIR,...`).

  Context/continuation splitting and the empty-context rule are the harness's own (`TemplateLM`, which its HF
  model uses too): the pair is tokenized whole and the continuation is the tokens after the context's.
  """

  def __init__(
      self,
      workdir: str,
      step: int | None = None,
      batch_size: int | str | None = None,
      max_length: int | None = None,
      dtype: str | None = None,
      max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
      num_devices: int | None = None,
      seed: int = 0,
      max_batch_size: int | None = None,
      device: str | None = None,
      progress: bool = True,
  ):
    """Restores `workdir` (newest or `step`) onto the evaluation mesh; defaults come from its saved config.

    batch_size: rows per model call (default, or 'auto': the config's eval.batch_size), rounded up to a multiple
    of the data-parallel devices. max_length: tokens per window (default train.seq_len). dtype: compute dtype
    override (e.g. float32). num_devices: use only the first N devices. The harness's `max_batch_size` and
    `device` are accepted and ignored.
    """
    super().__init__()
    # The harness always passes these (its CLI's --device defaults to cuda:0): JAX places the work on every
    # device it sees (choose them with JAX_PLATFORMS / CUDA_VISIBLE_DEVICES), and the batch size is ours.
    del max_batch_size, device
    workdir = os.path.expanduser(str(workdir))
    step = None if step in (None, "") else _int_arg("step", step, 0)
    num_devices = None if num_devices in (None, "") else _int_arg("num_devices", num_devices, 1)
    self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
    self._seed = _int_arg("seed", seed, 0)
    self._progress = bool(progress)
    rows = None if batch_size in (None, "", "auto") else _int_arg("batch_size", batch_size, 1)
    max_length = None if max_length in (None, "") else _int_arg("max_length", max_length, 1)

    # A bad dtype is refused before anything is restored.
    opened = workdir_lib.open(
        workdir, step=step, overrides={"model.dtype": str(dtype)} if dtype else None, num_devices=num_devices
    )
    config, params, self._mesh, self.step = opened.config, opened.params, opened.mesh, opened.step
    self.tokenizer_ = opened.tokenizer
    self._scorer = RowScorer(params, config, self._mesh)
    self.model = LoadedModel(config, params, self.step)  # generation, and anyone who wants the logits
    self.batch_size = self._scorer.round_batch_size(int(config.eval.batch_size if rows is None else rows))
    self._max_length = int(config.train.seq_len if max_length is None else max_length)
    self.workdir = workdir

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CLAHarnessLM:
    """Like the harness's, except that model_args win over the harness's own --batch_size (default 1)."""
    args = simple_parse_args_string(arg_string)
    return cls.create_from_arg_obj(args, additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CLAHarnessLM:
    """`cls(**arg_dict)` plus the harness's settings that model_args do not already give."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
    unknown = set(arg_dict) - _MODEL_ARGS
    if unknown:
      raise UserError(
          f"unknown model_args {', '.join(sorted(unknown))}; " f"cla_jax takes {', '.join(sorted(_MODEL_ARGS))}."
      )
    if not arg_dict.get("workdir"):
      raise UserError(
          "model_args has no workdir; name the cla_jax workdir to evaluate, e.g. "
          "--model_args workdir=runs/default,step=6."
      )
    return cls(**arg_dict, **extra)

  # ---------------------------------------------------------------------------------------------------------
  # What the harness asks of a model.
  # ---------------------------------------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer_.description

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Token ids of `string`: the model's tokenizer adds no BOS/EOS, whatever `add_special_tokens` says."""
    del add_special_tokens, kwargs
    return self.tokenizer_.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer_.decode(tokens)

  def _batches(self, windows: Sequence[evaluate.Window], length: int) -> Iterable[dict[str, np.ndarray]]:
    """This process's rows of fixed [batch_size, length] batches of `windows` (eval.py's `window_batches`)."""
    rows = self.batch_size // jax.process_count()
    lo = jax.process_index() * rows
    for batch in evaluate.window_batches(windows, self.batch_size, length):
      yield {k: v[lo : lo + rows] for k, v in batch.items()}

  def _bar(self, total: int, desc: str, disable: bool):
    return tqdm.tqdm(
        total=total,
        desc=desc,
        dynamic_ncols=True,
        leave=False,
        disable=disable or not self._progress or jax.process_index() != 0,
    )

  def _loglikelihood_tokens(
      self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False
  ) -> list[tuple[float, bool]]:
    """(summed continuation log-prob, continuation is greedy) of tokenized (context, continuation) pairs.

    The model is fed (context + continuation)[-(max_length + 1):][:-1], so a long context loses its left end;
    pairs are sorted by length (longest first) so each batch pads little, and batches are padded to a few
    bucketed lengths so few shapes compile.
    """
    windows = []
    for (_, continuation), context_enc, continuation_enc in requests:
      if not continuation_enc:
        windows.append(None)  # nothing to score: log-prob 0, trivially greedy
        continue
      if len(continuation_enc) > self.max_length:
        raise UserError(
            f"a continuation of {len(continuation_enc)} tokens does not fit max_length={self.max_length} "
            f"(continuation {continuation[:40]!r}...); raise max_length in --model_args."
        )
      seq = np.asarray((context_enc + continuation_enc)[-(self.max_length + 1) :], np.int32)
      weights = (np.arange(len(seq) - 1) >= len(seq) - 1 - len(continuation_enc)).astype(np.float32)
      windows.append(evaluate.Window(seq[:-1], seq[1:], weights))
    order = sorted((i for i, w in enumerate(windows) if w is not None), key=lambda i: -len(windows[i].inputs))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    bar = self._bar(len(order), "loglikelihood", disable_tqdm)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      length = _bucket(len(windows[chunk[0]].inputs), self.max_length)
      log_likelihood, is_greedy = self._scorer.score_rows(self._batches([windows[i] for i in chunk], length))
      for row, i in enumerate(chunk):
        results[i] = (float(log_likelihood[row]), bool(is_greedy[row]))
        (context, continuation), _, _ = requests[i]
        self.cache_hook.add_partial("loglikelihood", (context, continuation), results[i])
      bar.update(len(chunk))
    bar.close()
    return results

  def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole documents: eval.py's rolling windows (every token predicted once, EOS first)."""
    texts = [req.args[0] for req in requests]
    per_doc = [
        evaluate.rolling_windows(ids, self.max_length, self.eot_token_id) for ids in self.tokenizer_.encode_batch(texts)
    ]
    windows = [w for doc in per_doc for w in doc]
    total = -(-len(windows) // self.batch_size)
    batches = self._batches(windows, self.max_length)
    bar = self._bar(total, "loglikelihood_rolling", disable_tqdm)
    log_likelihood, _ = self._scorer.score_rows(_counted(batches, bar))
    bar.close()
    results, start = [], 0
    for text, doc in zip(texts, per_doc):
      results.append(math.fsum(log_likelihood[start : start + len(doc)]))
      start += len(doc)
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
    return results

  def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
    """Continuations of each context, cut before the first `until` string or EOS (greedy unless asked)."""
    generate = getattr(self.model, "generate", None)
    if generate is None:
      raise UserError(
          "generate_until tasks need KV-cached generation (LoadedModel.generate), which this cla_jax "
          "does not have yet; run loglikelihood tasks (multiple choice, perplexity) only."
      )
    results: list[str | None] = [None] * len(requests)
    # Same settings batch together (the harness's grouping); longest prompts first.
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    bar = self._bar(len(requests), "generate_until", disable_tqdm)
    for indices in groups.values():
      kwargs = lm_eval_utils.normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
      until = lm_eval_utils.handle_stop_sequences(kwargs.pop("until", None), eos=None)
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      if max_gen_toks >= self.max_length:
        raise UserError(
            f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length={self.max_length}; "
            "raise max_length or lower max_gen_toks."
        )
      sampling = {
          "temperature": float(kwargs.get("temperature", 0.0) or 0.0),
          "top_k": int(kwargs.get("top_k", 0) or 0),
          "top_p": float(kwargs.get("top_p", 1.0) or 1.0),
      }
      prompts = {
          i: (self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-(self.max_length - max_gen_toks) :]
          for i in indices
      }
      ordered = sorted(indices, key=lambda i: -len(prompts[i]))
      for start in range(0, len(ordered), self.batch_size):
        chunk = ordered[start : start + self.batch_size]
        new_ids = generate(
            [prompts[i] for i in chunk], max_new_tokens=max_gen_toks, seed=self._seed + start, **sampling
        )
        for i, ids in zip(chunk, new_ids):
          ids = list(ids)
          if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
          text = lm_eval_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return results

  def __repr__(self) -> str:
    return f"CLAHarnessLM(workdir={self.workdir!r}, step={self.step}, {sharding.describe(self._mesh)})"


_MODEL_ARGS = frozenset(
    (
        "workdir",
        "step",
        "batch_size",
        "max_length",
        "dtype",
        "max_gen_toks",
        "num_devices",
        "seed",
        "max_batch_size",
        "device",
        "progress",
    )
)


def _counted(batches: Iterable[Any], bar: tqdm.tqdm) -> Iterable[Any]:
  for batch in batches:
    yield batch
    bar.update(1)
