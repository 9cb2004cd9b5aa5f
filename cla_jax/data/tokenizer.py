"""Tokenizers: sentencepiece (trained on the training split and cached, or a given .model) and HF tokenizer.json.

`get_tokenizer(config)` is the one entry point; `fitted_vocab_size` returns the model's embedding size for it
(the caller decides where that goes) and `check_vocab_covers` is the one check that a model's vocabulary
covers a tokenizer's ids.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import sentencepiece as spm
from etils import epath

from cla_jax import paths
from cla_jax.data import sources, writer
from cla_jax.errors import UserError

# Bump when the sentencepiece trainer options below change, so cached tokenizers are retrained.
_SPM_RECIPE_VERSION = 1
# Byte fallback needs 256 byte pieces; below this vocab size they would crowd out real pieces.
_BYTE_FALLBACK_MIN_VOCAB = 1024
VOCAB_MULTIPLE = 128
# unk, </s> and "\n" are fixed pieces; sentencepiece needs room for at least a few learned ones.
_MIN_SPM_VOCAB = 8


class Tokenizer:
  """What the input pipeline needs: ids <-> text, the vocabulary size and the end-of-document id."""

  vocab_size: int
  eos_id: int
  checksum: str  # sha256 of the model file: part of every prepared split's fingerprint
  description: str
  threads: int = 0  # encode_batch threads; 0: all cores (prepare's worker processes use 1 each)
  filename: str  # what `save` writes: tokenizer.model or tokenizer.json
  _file_bytes: bytes

  def file_bytes(self) -> bytes:
    """The tokenizer file's contents (what `save` writes; prepare copies it next to the prepared splits)."""
    return self._file_bytes

  def save(self, directory: str | os.PathLike) -> epath.Path:
    """Writes the tokenizer file into `directory` (a workdir, a bucket); `data.tokenizer=<path>` loads it back."""
    path = epath.Path(directory) / self.filename
    writer.write_bytes(path, self._file_bytes)
    return path

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of several texts (implementations parallelise this)."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` file; EOS is the model's `</s>`."""

  def __init__(self, model_proto: bytes, description: str):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._file_bytes, self.filename = model_proto, "tokenizer.model"
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise UserError(f"sentencepiece model {description} has no EOS piece; train it with eos_id >= 0.")
    self.checksum = hashlib.sha256(model_proto).hexdigest()
    self.description = description

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=self.threads or os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Llama, GPT-NeoX, ...); EOS is found among the usual special tokens."""

  _EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")

  def __init__(self, data: bytes, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top  (only for tokenizer.json)

    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises a bare Exception
      reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
      raise UserError(
          f"data.tokenizer={path!r} is not a Hugging Face tokenizer.json ({reason}); give the "
          "tokenizer.json of a model, a sentencepiece .model file, or 'sentencepiece'."
      ) from None
    self._file_bytes, self.filename = data, "tokenizer.json"
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in self._EOS_CANDIDATES if t in vocab), None)
    if eos is None:
      raise UserError(f"{path}: no end-of-text token among {self._EOS_CANDIDATES}; use a tokenizer.json that has one.")
    self.eos_id = eos
    self.checksum = hashlib.sha256(data).hexdigest()
    self.description = path

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self.threads == 1:  # encode_batch would use every core (Rayon)
      return [self.encode(t) for t in texts]
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Non-empty lines of `texts` (sentencepiece's unit of training), up to max_chars characters in total."""
  total = 0
  for text in texts:
    for line in text.split("\n"):
      if not line.strip():
        continue
      # sentencepiece skips sentences above max_sentence_length bytes; cut long lines instead of losing them.
      for start in range(0, len(line), 2048):
        piece = line[start : start + 2048]
        yield piece
        total += len(piece)
        if max_chars and total >= max_chars:
          return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, max_chars: int = 0) -> bytes:
  """Trains a unigram sentencepiece model on `texts` whose encode/decode round-trips text exactly."""
  if vocab_size < _MIN_SPM_VOCAB:
    raise UserError(
        f"model.vocab_size={vocab_size} is too small to train a sentencepiece vocabulary; use at least "
        f"{_MIN_SPM_VOCAB} (the default is 2048)."
    )
  sentences = _sentences(texts, max_chars)
  first = next(sentences, None)
  if first is None:
    raise UserError(
        "the training text is empty (no non-blank line to train a tokenizer on); check that "
        "data.text_glob / the data source holds text."
    )
  writer = io.BytesIO()
  byte_fallback = vocab_size >= _BYTE_FALLBACK_MIN_VOCAB
  failures: list[BaseException] = []
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_stop_on_error(itertools.chain([first], sentences), failures),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type="unigram",
        # Exact round trip: no normalisation, whitespace (reST indentation, newlines) kept as written.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=byte_fallback,
        character_coverage=0.9995 if byte_fallback else 1.0,
        # A small corpus may not support the requested size; take what it gives (checked against the model).
        hard_vocab_limit=False,
        pad_id=-1,
        bos_id=-1,
        eos_id=1,
        unk_id=0,
        user_defined_symbols=["\n"],
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    if failures:
      raise failures[0] from None  # our own error (an unreadable file), not sentencepiece's wrapper around it
    message = str(e).strip()
    if "vocab" in message.lower():  # e.g. "Vocabulary size is too high": the corpus has fewer pieces
      raise UserError(
          f"sentencepiece training failed ({message}); the corpus is too small for vocab_size="
          f"{vocab_size}: try a smaller model.vocab_size or more data."
      ) from None
    raise UserError(f"sentencepiece training failed ({message}).") from None
  if failures:
    raise failures[0]
  return writer.getvalue()


def _stop_on_error(sentences: Iterator[str], failures: list[BaseException]) -> Iterator[str]:
  """`sentences`, ending early on an error, which goes to `failures` for the caller to raise as it was.

  sentencepiece turns an exception from its iterator into a RuntimeError holding the whole traceback
  as text; the message that names the bad file would then be only its buried last line.
  """
  try:
    yield from sentences
  except Exception as e:  # pylint: disable=broad-except  (re-raised by train_sentencepiece)
    failures.append(e)


def cache_dir_of(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where tokenizers and prepared splits live: data.cache_dir, else data.data_dir when it is a local path."""
  cache_dir = str(config.data.cache_dir)
  if not cache_dir:
    data_dir = str(config.data.data_dir)
    cache_dir = "~/.cache/cla_jax" if paths.is_remote(data_dir) else data_dir
  return pathlib.Path(os.path.expanduser(cache_dir))


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer named by `config.data.tokenizer`, training and caching sentencepiece when asked."""
  name = str(config.data.tokenizer)
  prepared_dir = str(config.data.prepared_dir)
  if name == "sentencepiece" and prepared_dir:
    # A prepared dataset keeps the tokenizer it was tokenized with, so training needs no raw corpus.
    return _prepared_tokenizer(prepared_dir)
  if name == "sentencepiece":
    return _trained_sentencepiece(config)
  path = os.path.expanduser(name)
  if not os.path.exists(path):
    raise UserError(
        f"data.tokenizer={name!r}: no such file; use 'sentencepiece' (train one on the data), "
        "a sentencepiece .model file or a Hugging Face tokenizer.json."
    )
  if os.path.isdir(path):
    raise UserError(
        f"data.tokenizer={name!r} is a directory; name the tokenizer file inside it "
        "(tokenizer.json or a sentencepiece .model)."
    )
  return from_file_bytes(pathlib.Path(path).read_bytes(), path)


def from_file_bytes(data: bytes, path: str, description: str = "") -> Tokenizer:
  """The tokenizer in file `path` whose bytes are `data`: tokenizer.json by its suffix, else sentencepiece."""
  if path.endswith(".json"):
    return HFTokenizer(data, path)
  try:
    return SentencePieceTokenizer(data, description or path)
  except RuntimeError:
    raise UserError(f"data.tokenizer={path!r} is not a sentencepiece model (or tokenizer.json).") from None


def _prepared_tokenizer(prepared_dir: str) -> Tokenizer:
  """The tokenizer file that `python -m cla_jax.cli.prepare` saved in its output directory."""
  root = epath.Path(prepared_dir if paths.is_remote(prepared_dir) else os.path.expanduser(prepared_dir))
  for filename in ("tokenizer.model", "tokenizer.json"):
    if (root / filename).exists():
      return from_file_bytes((root / filename).read_bytes(), str(root / filename))
  raise UserError(
      f"data.prepared_dir={prepared_dir!r} holds no tokenizer.model / tokenizer.json; prepare it with "
      f"`python -m cla_jax.cli.prepare --config=... --output={prepared_dir}`."
  )


def _trained_sentencepiece(config: ml_collections.ConfigDict) -> SentencePieceTokenizer:
  """Loads the cached sentencepiece model trained on this data, training it first when missing."""
  source = sources.get_source(config)
  split = str(config.data.train_split)
  vocab_size = int(config.model.vocab_size)
  max_chars = int(config.data.tokenizer_train_chars)
  key = f"spm-v{_SPM_RECIPE_VERSION}|{source.fingerprint(split)}|vocab={vocab_size}|chars={max_chars}"
  fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = cache_dir_of(config) / "tokenizers" / f"{fingerprint}.model"
  description = f"{path} (sentencepiece, vocab {vocab_size}, trained on {source.name} {split})"
  if not path.exists():
    logging.info("training %s", description)
    # Written atomically: concurrent hosts never read a half-written model.
    writer.write_bytes(path, train_sentencepiece(source.documents(split), vocab_size, max_chars))
  return SentencePieceTokenizer(path.read_bytes(), description)


def check_vocab_covers(tokenizer: Tokenizer, vocab_size: int, fix: str) -> None:
  """Raises a UserError (ending with `fix`) when a model of `vocab_size` cannot embed every id of `tokenizer`.

  An out-of-range id would be silently clipped by the embedding gather, so this is an error, never a warning.
  """
  if int(vocab_size) < tokenizer.vocab_size:
    raise UserError(
        f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
        f"({tokenizer.description}); {fix}"
    )


def padded_vocab_size(tokenizer: Tokenizer) -> int:
  """The tokenizer's size rounded up to a multiple of 128 (extra rows are never looked up; keeps matmuls aligned)."""
  return -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def fitted_vocab_size(tokenizer: Tokenizer, vocab_size: int, pad_vocab: bool) -> int:
  """The model vocabulary size for `tokenizer`: `padded_vocab_size(tokenizer)` with `pad_vocab`, else `vocab_size`.

  Without `pad_vocab`, `vocab_size` (model.vocab_size) must cover every token id (see `check_vocab_covers`).
  """
  if pad_vocab:
    return padded_vocab_size(tokenizer)
  check_vocab_covers(
      tokenizer,
      vocab_size,
      f"set --config.model.vocab_size={padded_vocab_size(tokenizer)} or --config.data.pad_vocab=True.",
  )
  return int(vocab_size)
