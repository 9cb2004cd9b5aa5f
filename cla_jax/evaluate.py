"""Evaluation of a trained workdir: validation-split perplexity, and rolling-window perplexity of raw text.

Two measurements, both from nothing but a workdir (its config.json and orbax checkpoints):

* Validation split (`run(workdir)`): mean next-token loss over the first `eval.max_tokens` target tokens of
  the config's validation split, in the input pipeline's fixed order, batches sharded over the mesh.
* Raw text (`run(workdir, text_file=...)`): the log-likelihood of every document, scored the way
  LM-Eval-Harness's `loglikelihood_rolling` does (`wikitext` task): disjoint windows of `max_length`
  predicted tokens, each later window conditioned on the tokens just before it; every token is predicted
  exactly once, the first one from an EOS prefix. Reported per token, per word and per UTF-8 byte.

Both go through `train_step.loss_fn`, the loss the model was trained with. See docs/eval.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from cla_jax import config_lib, sharding, train_step
from cla_jax import metrics as metrics_lib
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.data import batches as batches_lib
from cla_jax.data import prepare, splits
from cla_jax.errors import UserError

TEXT_FORMATS = ("wikitext", "plain")

# ---------------------------------------------------------------------------------------------------------
# Raw text: documents, detokenization, word and byte counts.
# ---------------------------------------------------------------------------------------------------------


def _is_title(line: str) -> bool:
  """A wikitext top-level heading ` = Title = ` (one '=' each side; ` = = Section = = ` is not)."""
  s = line.strip()
  return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") and not s.endswith("= =")


def split_documents(text: str, text_format: str = "wikitext") -> list[str]:
  """Documents of a raw text file.

  `wikitext`: a document is a top-level heading line and every line up to the next one (the pages of
  `EleutherAI/wikitext_document_level`, which LM-Eval-Harness's `wikitext` task scores); blank lines before
  the first heading are dropped, other text before it is a document of its own. `plain`: the whole file is
  one document. Whitespace-only documents are dropped.
  """
  if text_format not in TEXT_FORMATS:
    raise UserError(f"text format {text_format!r} is not one of {TEXT_FORMATS}.")
  if text_format == "plain":
    return [text] if text.strip() else []
  docs, current = [], []
  for line in text.splitlines(keepends=True):
    if _is_title(line) and current:
      docs.append("".join(current))
      current = []
    current.append(line)
  if current:
    docs.append("".join(current))
  return [d for d in docs if d.strip()]


# Wikitext's tokenized spelling -> ordinary text, applied in order (the harness scores detokenized text too).
_WIKITEXT_RULES: tuple[tuple[str, str], ...] = (
    (r"s ' ", "s' "),  # plural possessive
    (r" @([-,.])@ ", r"\1"),  # 1 @,@ 000 -> 1,000 ; well @-@ known -> well-known
    (r" ([:;.!?,]) ", r"\1 "),  # word , word -> word, word
    (r"\( *([^)]*?) *\)", r"(\1)"),  # ( x ) -> (x)
    (r"\[ *([^\]]*?) *\]", r"[\1]"),
    (r"\{ *([^}]*?) *\}", r"{\1}"),
    (r'" *([^"]*?) *"', r'"\1"'),
    (r"(=)(?: (?==))", r"\1"),  # = = Section = = -> == Section ==
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (r" *\n *", "\n"),  # spaces around line breaks
    (r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1"),  # do n't -> don't ; it 's -> it's
    (r" ([.,;:!?])$", r"\1"),  # punctuation at the very end
)


def wikitext_detokenize(text: str) -> str:
  """Undoes wikitext's tokenized spelling (`@-@`, spaces before punctuation, `= = x = =`) before scoring."""
  for pattern, replacement in _WIKITEXT_RULES:
    text = re.sub(pattern, replacement, text)
  return text


def count_words(doc: str) -> int:
  """Words as LM-Eval-Harness counts them: `len(re.split(r"\\s+", doc))` of the original document."""
  return len(re.split(r"\s+", doc))


def count_bytes(doc: str) -> int:
  """UTF-8 bytes of the original document."""
  return len(doc.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Rolling windows.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
  """One model call: `inputs` -> `targets` (same length), loss counted where `weights` is 1."""

  inputs: np.ndarray  # int32 [n <= max_length]
  targets: np.ndarray  # int32 [n]
  weights: np.ndarray  # float32 [n]


def rolling_windows(tokens: Sequence[int], max_length: int, prefix_token: int) -> list[Window]:
  """Windows that predict each of `tokens` exactly once, with as much left context as fits.

  Window k predicts tokens[k*L : (k+1)*L] (L = max_length). The first is fed the prefix token and the
  first L-1 tokens; a later one is fed the L tokens before each prediction, so its first positions
  are context only (weight 0). This is LM-Eval-Harness's `get_rolling_token_windows(context_len=1)`
  followed by `make_disjoint_window`.
  """
  if max_length < 1:
    raise UserError(f"max_length={max_length} must be at least 1.")
  seq = np.asarray([prefix_token, *tokens], np.int32)  # seq[j + 1] = tokens[j]
  windows = []
  for first in range(0, len(tokens), max_length):  # predict tokens[first:end]
    end = min(first + max_length, len(tokens))
    start = max(0, end - max_length)  # window covers seq[start:end] -> seq[start+1:end+1]
    predicts = np.arange(start, end) >= first  # position i predicts tokens[start + i]
    windows.append(Window(seq[start:end], seq[start + 1 : end + 1], predicts.astype(np.float32)))
  return windows


def window_batches(windows: Iterable[Window], batch_size: int, length: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape [batch_size, length] batches of windows, right-padded with weight 0 (rows and positions)."""

  def empty():
    return {
        "inputs": np.zeros((batch_size, length), np.int32),
        "targets": np.zeros((batch_size, length), np.int32),
        "weights": np.zeros((batch_size, length), np.float32),
    }

  batch, row = empty(), 0
  for w in windows:
    n = len(w.inputs)
    batch["inputs"][row, :n], batch["targets"][row, :n], batch["weights"][row, :n] = w.inputs, w.targets, w.weights
    row += 1
    if row == batch_size:
      yield batch
      batch, row = empty(), 0
  if row:
    yield batch


# ---------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------


def text_metrics(nll: float, tokens: int, words: int, num_bytes: int) -> dict[str, float]:
  """Token/word/byte perplexities and bits per byte from a summed negative log-likelihood (nats)."""
  return {
      "loss": nll / tokens,
      "token_perplexity": metrics_lib.perplexity(nll / tokens),
      "word_perplexity": metrics_lib.perplexity(nll / words),
      "byte_perplexity": metrics_lib.perplexity(nll / num_bytes),
      "bits_per_byte": nll / num_bytes / math.log(2),
  }


def format_table(metrics: dict[str, Any]) -> str:
  """The metrics as an aligned two-column table."""
  width = max(len(k) for k in metrics)
  lines = []
  for key, value in metrics.items():
    if isinstance(value, float):
      value = f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"
    lines.append(f"{key:<{width}}  {value}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The loss over batches.
# ---------------------------------------------------------------------------------------------------------


class Scorer:
  """Summed next-token loss and token count of host-local batches: `train_step.jit_eval_step` on the mesh."""

  def __init__(self, params: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.params, self.mesh = params, mesh
    self.parallelism = sharding.batch_parallelism(mesh)
    model = model_lib.Transformer(config_lib.model_config(config))
    self._step = train_step.jit_eval_step(model, mesh, jax.tree.map(lambda x: x.sharding, params))

  def round_batch_size(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the batch parallelism (whole rows per device)."""
    return -(-batch_size // self.parallelism) * self.parallelism

  def score(self, batches: Iterable[dict[str, np.ndarray]], params: Any = None) -> tuple[float, float]:
    """(sum of token losses, number of weighted tokens) over host-local batches, summed in float64.

    `params` (same shardings as the constructor's; default: those) lets a trainer score its current state.
    One batch stays in flight: the host prepares batch i+1 while the devices compute batch i.
    """
    params = self.params if params is None else params
    outputs, pending = [], None
    with jax.set_mesh(self.mesh):
      for batch in batches:
        out = self._step(params, sharding.global_batch(batch, self.mesh))
        if pending is not None:
          jax.block_until_ready(pending)
        pending = out
        outputs.append(out)
    outputs = jax.device_get(outputs)
    return (math.fsum(float(o["loss_sum"]) for o in outputs), math.fsum(float(o["num_tokens"]) for o in outputs))


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool):
  """A tqdm bar over evaluation batches (on stderr; only on the first process)."""
  return tqdm.tqdm(
      iterable,
      total=total,
      desc=desc,
      unit="batch",
      dynamic_ncols=True,
      leave=False,
      disable=not enabled or jax.process_index() != 0,
  )


def evaluate_split(
    scorer: Scorer,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    *,
    batch_size: int,
    max_tokens: int,
    split: str,
    progress: bool = True,
) -> dict[str, Any]:
  """Mean loss and perplexity over the first `max_tokens` target tokens of a split (<= 0: all of it)."""
  seq_len = int(config.train.seq_len)
  data = prepare.open_split(config, tokenizer, split, seq_len, check_seq_len=False)
  batches = batches_lib.eval_batches(
      data,
      batch_size,
      seq_len,
      max_tokens,
      eos_id=tokenizer.eos_id,
      packing=config.data.packing,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  total = -(-batches_lib.num_targets(data, max_tokens) // (batch_size * seq_len))
  nll, tokens = scorer.score(_progress(batches, total, f"eval {split}", progress))
  return {
      "split": split,
      "loss": nll / tokens,
      "perplexity": metrics_lib.perplexity(nll / tokens),
      "tokens": int(tokens),
  }


def evaluate_text(
    scorer: Scorer,
    tokenizer: Any,
    text: str,
    *,
    batch_size: int,
    max_length: int,
    text_format: str = "wikitext",
    progress: bool = True,
) -> dict[str, Any]:
  """Rolling-window log-likelihood of each document of `text`, as token, word and byte perplexities."""
  docs = split_documents(text, text_format)
  if not docs:
    raise UserError("the text file has no text to evaluate.")
  scored = [wikitext_detokenize(d) if text_format == "wikitext" else d for d in docs]
  windows = [w for ids in tokenizer.encode_batch(scored) for w in rolling_windows(ids, max_length, tokenizer.eos_id)]
  total = -(-len(windows) // batch_size)
  rows = batch_size // jax.process_count()
  lo = jax.process_index() * rows  # every host builds the same windows and feeds its rows of each batch
  batches = ({k: v[lo : lo + rows] for k, v in b.items()} for b in window_batches(windows, batch_size, max_length))
  nll, tokens = scorer.score(_progress(batches, total, "eval text", progress))
  if not tokens:
    raise UserError("the text file tokenizes to nothing; pass a file with text.")
  words, num_bytes = sum(map(count_words, docs)), sum(map(count_bytes, docs))
  return {
      "documents": len(docs),
      "windows": len(windows),
      "max_length": max_length,
      "tokens": int(tokens),
      "words": words,
      "bytes": num_bytes,
      **text_metrics(nll, tokens, words, num_bytes),
  }


# ---------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------


def run(
    workdir: str,
    *,
    step: int | None = None,
    text_file: str | None = None,
    text_format: str = "wikitext",
    max_length: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    split: str | None = None,
    overrides: dict[str, Any] | None = None,
    num_devices: int | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
  """Evaluates the latest (or `step`) checkpoint of `workdir`; returns the metrics and writes DIR/eval/*.json.

  Without `text_file`: loss and perplexity on `split` (default: the config's validation split) over
  `max_tokens` tokens (default config.eval.max_tokens). With it: rolling-window perplexities of the file's
  documents at `max_length` (default config.train.seq_len). `overrides` changes data/eval/mesh fields of the
  saved config; `num_devices` limits the mesh to the first N devices (pure data parallelism).
  """
  workdir = os.path.expanduser(workdir)
  path = pathlib.Path(text_file).expanduser() if text_file is not None else None
  if path is not None and not path.is_file():
    raise UserError(f"--text_file={text_file}: no such file.")
  if text_format not in TEXT_FORMATS:
    raise UserError(f"text format {text_format!r} is not one of {TEXT_FORMATS}.")
  for flag, value in (("batch_size", batch_size), ("max_length", max_length)):
    if value is not None and value < 1:
      raise UserError(f"--{flag}={value} must be at least 1 (or left out for the config's value).")
  text = None
  if path is not None:
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      raise UserError(f"--text_file={text_file} is not UTF-8 text (a binary file?); pass a plain-text file.") from None
  opened = workdir_lib.open(workdir, step=step, overrides=overrides, num_devices=num_devices)
  config, step, tokenizer = opened.config, opened.step, opened.tokenizer
  scorer = Scorer(opened.params, config, opened.mesh)
  batch_size = scorer.round_batch_size(int(config.eval.batch_size if batch_size is None else batch_size))

  if path is not None:
    max_length = int(config.train.seq_len if max_length is None else max_length)
    metrics = evaluate_text(
        scorer,
        tokenizer,
        text,
        batch_size=batch_size,
        max_length=max_length,
        text_format=text_format,
        progress=progress,
    )
    name = re.sub(r"\W+", "_", path.stem).strip("_") or "text"
    source = {"text_file": str(path), "text_format": text_format}
  else:
    split = splits.resolve_split(config, split)
    max_tokens = int(config.eval.max_tokens if max_tokens is None else max_tokens)
    metrics = evaluate_split(
        scorer, config, tokenizer, batch_size=batch_size, max_tokens=max_tokens, split=split, progress=progress
    )
    name, source = re.sub(r"\W+", "_", split), {"source": str(config.data.source)}

  result = {**source, **metrics, "step": int(step), "workdir": workdir}
  if write and jax.process_index() == 0:
    out = pathlib.Path(workdir) / workdir_lib.EVAL_DIR
    try:
      out.mkdir(parents=True, exist_ok=True)
      (out / f"{name}_step{step}.json").write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:  # e.g. a read-only workdir: the result still reaches the caller (and stdout)
      print(
          f"warning: could not write {out / f'{name}_step{step}.json'} ({e.strerror}); the result is only " f"printed.",
          file=sys.stderr,
          flush=True,
      )
  return result
