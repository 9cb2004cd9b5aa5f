"""The sentencepiece tokenizer of a cla_jax model for transformers, exported by cla_jax (`cla-export-hf`).

Encoding and decoding call sentencepiece itself on the model's `tokenizer.model`, so transformers gives exactly
the ids cla_jax trained on. A translation into a `tokenizer.json` cannot promise that: sentencepiece breaks ties
between equal-score segmentations (e.g. inside runs of one repeated character) by float32 accumulation order,
which the `tokenizers` library does not reproduce. No BOS or EOS is added, as cla_jax adds none when it encodes,
and text that spells a special token (`</s>`) is encoded as text, as sentencepiece does. This file ships inside
the cla_jax package and is copied into every export whose tokenizer is a sentencepiece model.
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class CLATokenizer(PreTrainedTokenizer):
  """transformers' view of a sentencepiece model: ids and text exactly as sentencepiece gives them."""

  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, vocab_file, eos_token="</s>", unk_token="<unk>", **kwargs):
    self.vocab_file = vocab_file
    self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
    kwargs.setdefault("add_bos_token", False)
    kwargs.setdefault("add_eos_token", False)
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    super().__init__(eos_token=eos_token, unk_token=unk_token, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.sp_model.get_piece_size()

  def get_vocab(self) -> dict[str, int]:
    vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
    vocab.update(self.added_tokens_encoder)
    return vocab

  def tokenize(self, text: str, **kwargs) -> list[str]:
    # The whole text goes to sentencepiece: transformers' own splitting at special tokens and its whitespace
    # handling around them would give other pieces than training saw.
    return self.sp_model.encode(text, out_type=str)

  def _tokenize(self, text: str, **kwargs) -> list[str]:
    return self.sp_model.encode(text, out_type=str)

  def _convert_token_to_id(self, token: str) -> int:
    return self.sp_model.piece_to_id(token)

  def _convert_id_to_token(self, index: int) -> str:
    return self.sp_model.id_to_piece(index)

  def convert_tokens_to_string(self, tokens: list[str]) -> str:
    return self.sp_model.decode_pieces(tokens)

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

  def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
    ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
    if skip_special_tokens:
      special = set(self.all_special_ids)
      ids = [i for i in ids if i not in special]
    # sentencepiece decodes as cla_jax does: control pieces (</s>) vanish, byte pieces join into UTF-8.
    return self.sp_model.decode(ids)

  def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
    out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
    if os.path.abspath(self.vocab_file) != os.path.abspath(out):
      shutil.copyfile(self.vocab_file, out)
    return (out,)
