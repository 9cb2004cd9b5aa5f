"""Workdir configs and prepared datasets written by earlier versions load with today's code (tests/testdata/)."""

import json
import pathlib
import re

import numpy as np
import pytest
import sentencepiece as spm

from cla_jax import config_lib
from cla_jax.data import batches as batches_lib
from cla_jax.data import prepare, sources
from cla_jax.data import tokenizer as tokenizer_lib

TESTDATA = pathlib.Path(__file__).parent / "testdata"
OLD_CONFIG = TESTDATA / "config_a34d6bc.json"
OLD_PREPARED = TESTDATA / "prepared_278c628"


def _leaves(tree: dict, prefix: str = "") -> dict:
  """{"data.seed": 0, ...}: every field of a nested config dict by its dotted name."""
  out = {}
  for key, value in tree.items():
    out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
  return out


def _on_test_corpus(config):
  """`config` reading tests/testdata/corpus as the prepared dataset there was made from it."""
  config.data.update(source="text", text_glob=str(TESTDATA / "corpus" / "*.txt"), eval_fraction=0.25)
  config.model.vocab_size = 64
  config.train.update(seq_len=16, batch_size=4)
  return config


def test_first_versions_config_gets_the_new_fields_and_keeps_its_values():
  saved = _leaves(json.loads(OLD_CONFIG.read_text()))
  default = _leaves(config_lib.load(config_lib.DEFAULT_CONFIG).to_dict())
  added = set(default) - set(saved)
  assert {"data.prepared_dir", "train.teacher", "train.divergence_check"} <= added
  config = config_lib.from_json(OLD_CONFIG.read_text())
  got = _leaves(config.to_dict())
  assert set(got) == set(default) | set(saved)
  assert {k: got[k] for k in saved} == saved  # e.g. model.remat='none', where the default is now 'auto'
  assert saved["model.remat"] != default["model.remat"]
  assert {k: got[k] for k in added} == {k: default[k] for k in added}
  # What the first version did without these fields: prepare into the cache, no teacher.
  assert config.data.prepared_dir == "" and config.train.teacher == ""
  with pytest.raises(AttributeError):
    config.data.no_such_field = 1  # still locked: a mistyped field fails loudly


def test_data_code_reads_the_first_versions_config(tmp_path):
  """Tokenizer and prepare step on an upgraded old config read fields it never had (data.prepared_dir)."""
  config = _on_test_corpus(config_lib.from_json(OLD_CONFIG.read_text()))
  config.data.cache_dir = str(tmp_path)
  tok = tokenizer_lib.get_tokenizer(config)
  data = prepare.open_split(config, tok, "train", config.train.seq_len)
  stream = np.concatenate([tok.encode(doc) + [tok.eos_id] for doc in sources.get_source(config).documents("train")])
  np.testing.assert_array_equal(data.tokens(0, data.num_tokens), stream)


@pytest.mark.slow
def test_prepared_dataset_written_by_278c628_trains_and_evaluates():
  config = _on_test_corpus(config_lib.load(config_lib.DEFAULT_CONFIG))
  config.data.prepared_dir = str(OLD_PREPARED)
  tok = tokenizer_lib.get_tokenizer(config)  # the dataset's own tokenizer.model
  sp = spm.SentencePieceProcessor(model_file=str(OLD_PREPARED / "tokenizer.model"))  # read by sentencepiece itself
  seq_len, width = config.train.seq_len, config.train.batch_size
  streams = {}
  for split in ("train", "validation"):
    docs = list(sources.get_source(config).documents(split))
    streams[split] = np.array([t for doc in docs for t in sp.encode(doc) + [sp.eos_id()]])
  assert tok.checksum == json.loads((OLD_PREPARED / "train" / "index.json").read_text())["tokenizer_checksum"]

  data = prepare.open_split(config, tok, "train", seq_len)
  np.testing.assert_array_equal(data.tokens(0, data.num_tokens), streams["train"])
  batches = batches_lib.TrainBatches(data, width, config.data, tok.eos_id, process_index=0, process_count=1)
  num_windows = (len(streams["train"]) - 1) // seq_len
  for step in (0, 7):
    rows = step * width + np.arange(width)
    for row, inputs in zip(rows, batches.batch(step)["inputs"]):
      start = np.random.default_rng([config.data.seed, row // num_windows]).permutation(num_windows)[row % num_windows]
      np.testing.assert_array_equal(inputs, streams["train"][start * seq_len : (start + 1) * seq_len])

  validation = prepare.open_split(config, tok, "validation", seq_len)
  evaluated = list(batches_lib.eval_batches(validation, 3, 8, 0, eos_id=tok.eos_id, packing=False))
  weights = np.concatenate([b["weights"].reshape(-1) for b in evaluated])
  targets = np.concatenate([b["targets"].reshape(-1) for b in evaluated])
  np.testing.assert_array_equal(targets[weights == 1], streams["validation"][1:])


def test_no_config_field_has_a_second_default():
  """Code reads config.<section>.<field>; a config older than a field gets it from config_lib.upgrade only."""
  root = pathlib.Path(config_lib.__file__).parent
  second_defaults = re.compile(r"\b(config|model|data|train|eval|mesh|checkpoint)\.get\(")
  found = [
      f"{path.relative_to(root)}:{number}: {line.strip()}"
      for path in sorted(root.rglob("*.py"))
      for number, line in enumerate(path.read_text().splitlines(), 1)
      if second_defaults.search(line)
  ]
  assert not found, found
