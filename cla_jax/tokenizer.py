"""Tokenizers: sentencepiece (trained on the training split and cached, or a given .model) and HF tokenizer.json.

`get_tokenizer(config)` is the one entry point; `check_vocab_size(config, tokenizer)` reconciles the model's
embedding size with it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tempfile
from typing import Iterable, Iterator, Sequence

import ml_collections
import sentencepiece as spm

from cla_jax import paths
from cla_jax.errors import UserError

# Bump when the sentencepiece trainer options below change, so cached tokenizers are retrained.
_SPM_RECIPE_VERSION = 1
# Byte fallback needs 256 byte pieces; below this vocab size they would crowd out real pieces.
_BYTE_FALLBACK_MIN_VOCAB = 1024
VOCAB_MULTIPLE = 128


class Tokenizer:
  """What the input pipeline needs: ids <-> text, the vocabulary size and the end-of-document id."""

  vocab_size: int
  eos_id: int
  checksum: str  # sha256 of the model file: part of every token cache's fingerprint
  description: str
  filename: str  # what `save` writes: tokenizer.model or tokenizer.json
  _file_bytes: bytes

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Writes the tokenizer file into `directory` (e.g. a workdir); `data.tokenizer=<path>` loads it back."""
    path = pathlib.Path(directory) / self.filename
    _atomic_write(path, self._file_bytes)
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
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Llama, GPT-NeoX, ...); EOS is found among the usual special tokens."""

  _EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top

    data = pathlib.Path(path).read_bytes()
    self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
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
        piece = line[start:start + 2048]
        yield piece
        total += len(piece)
        if max_chars and total >= max_chars:
          return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, max_chars: int = 0) -> bytes:
  """Trains a unigram sentencepiece model on `texts` whose encode/decode round-trips text exactly."""
  writer = io.BytesIO()
  byte_fallback = vocab_size >= _BYTE_FALLBACK_MIN_VOCAB
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts, max_chars),
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
        pad_id=-1, bos_id=-1, eos_id=1, unk_id=0,
        user_defined_symbols=["\n"],
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise UserError(f"sentencepiece training failed ({str(e).strip()}); try a smaller model.vocab_size.") from None
  return writer.getvalue()


def cache_dir_of(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where tokenizers and token caches live: data.cache_dir, else data.data_dir when it is a local path."""
  cache_dir = config.data.get("cache_dir", "") or ""
  if not cache_dir:
    data_dir = str(config.data.data_dir)
    cache_dir = "~/.cache/cla_jax" if paths.is_remote(data_dir) else data_dir
  return pathlib.Path(os.path.expanduser(cache_dir))


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  """Writes via a temporary file and a rename, so concurrent hosts never read a half-written file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer named by `config.data.tokenizer`, training and caching sentencepiece when asked."""
  name = str(config.data.tokenizer)
  if name == "sentencepiece":
    return _trained_sentencepiece(config)
  path = os.path.expanduser(name)
  if not os.path.exists(path):
    raise UserError(f"data.tokenizer={name!r}: no such file; use 'sentencepiece' (train one on the data), "
                    "a sentencepiece .model file or a Hugging Face tokenizer.json.")
  if path.endswith(".json"):
    return HFTokenizer(path)
  try:
    return SentencePieceTokenizer(pathlib.Path(path).read_bytes(), path)
  except RuntimeError:
    raise UserError(f"data.tokenizer={name!r} is not a sentencepiece model (or tokenizer.json).") from None


def _trained_sentencepiece(config: ml_collections.ConfigDict) -> SentencePieceTokenizer:
  """Loads the cached sentencepiece model trained on this data, training it first when missing."""
  from cla_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (the pipeline imports this module)

  source = input_pipeline.get_source(config)
  split = str(config.data.train_split)
  vocab_size = int(config.model.vocab_size)
  max_chars = int(config.data.get("tokenizer_train_chars", 0) or 0)
  key = f"spm-v{_SPM_RECIPE_VERSION}|{source.fingerprint(split)}|vocab={vocab_size}|chars={max_chars}"
  fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = cache_dir_of(config) / "tokenizers" / f"{fingerprint}.model"
  description = f"{path} (sentencepiece, vocab {vocab_size}, trained on {source.name} {split})"
  if not path.exists():
    logging.info("training %s", description)
    _atomic_write(path, train_sentencepiece(source.documents(split), vocab_size, max_chars))
  return SentencePieceTokenizer(path.read_bytes(), description)


def check_vocab_size(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> int:
  """The model vocab size to use: config.model.vocab_size, which must cover every token id.

  With `data.pad_vocab`, `config.model.vocab_size` is set to the tokenizer's size rounded up to a multiple
  of 128 (extra embedding rows are never looked up; the rounding keeps matmuls aligned). Otherwise a model
  vocab smaller than the tokenizer's is an error: out-of-range ids would be silently clipped by the gather.
  """
  needed = tokenizer.vocab_size
  padded = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  if config.data.get("pad_vocab", False):
    config.model.vocab_size = padded
    return padded
  if int(config.model.vocab_size) < needed:
    raise UserError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {needed} tokens "
        f"({tokenizer.description}); set --config.model.vocab_size={padded} or --config.data.pad_vocab=True.")
  return int(config.model.vocab_size)
