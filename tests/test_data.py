"""Input pipeline: sources, the Python-docs TFDS builder, token caches, batching, hosts, resumption, eval."""

import hashlib
import json
import math
import os
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cla_jax.data import batches as batches_lib
from cla_jax.data import prepare, python_docs, sources
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError

WORDS = (
    "the a an of to in is and for with that this module function class object value return "
    "list dict string file path error exception import data type call method default argument "
    "python interpreter thread lock socket buffer bytes encoding iterator generator context manager "
    "when which may be can not if else raise see also note example version changed added"
).split()


def prose(rng: np.random.Generator, paragraphs: int) -> str:
  """reST-shaped English-like text: a title, paragraphs, an indented directive block."""
  title = " ".join(rng.choice(WORDS, 3)).title()
  parts = [title, "=" * len(title), ""]
  for _ in range(paragraphs):
    sentences = [" ".join(rng.choice(WORDS, rng.integers(4, 12))).capitalize() + "." for _ in range(4)]
    parts += [" ".join(sentences), ""]
  parts += [".. note::", "", "   " + " ".join(rng.choice(WORDS, 8)) + ".", ""]
  return "\n".join(parts)


@pytest.fixture(scope="module")
def rst_tree(tmp_path_factory):
  """A small directory shaped like python3.11-doc's html/_sources (subdirs, *.rst.txt)."""
  root = tmp_path_factory.mktemp("sources")
  rng = np.random.default_rng(0)
  for i, rel in enumerate(
      ["about.rst.txt", "bugs.rst.txt"]
      + [
          f"{d}/{name}{j}.rst.txt"
          for d, name in (("library", "mod"), ("tutorial", "part"), ("c-api", "api"))
          for j in range(8)
      ]
  ):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(prose(rng, 3 + i % 4), encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def docs_data_dir(tmp_path_factory, rst_tree):
  """A data dir with cla_python_docs prepared from rst_tree (shared: preparing takes a second)."""
  data_dir = tmp_path_factory.mktemp("data")
  python_docs.prepare(str(data_dir), source_dir=str(rst_tree))
  return data_dir


@pytest.fixture
def config(tiny_config, docs_data_dir, tmp_path):
  """tiny_config reading the test corpus; caches in a fresh dir (shared tokenizer via the data dir)."""
  tiny_config.data.update(data_dir=str(docs_data_dir), cache_dir=str(docs_data_dir / "cache"), prefetch=2)
  return tiny_config


@pytest.fixture
def tok(config):
  return tokenizer_lib.get_tokenizer(config)


def train_batches(config, tok, process_index=0, process_count=1):
  """TrainBatches over the config's train split, built as the trainer builds them (one host unless told)."""
  data = prepare.open_split(config, tok, "train", config.train.seq_len)
  return batches_lib.TrainBatches(data, config.train.batch_size, config.data, tok.eos_id, process_index, process_count)


# ---------------------------------------------------------------------------------------------- sources


def test_python_docs_builder_split_and_checksum(rst_tree, docs_data_dir):
  files = sorted(os.path.relpath(os.path.join(d, f), rst_tree) for d, _, fs in os.walk(rst_tree) for f in fs)
  # Independent reference for the fixed split: 5% of files, rounded up, smallest sha256 of the path.
  held_out = sorted(files, key=lambda f: hashlib.sha256(f.encode()).digest())[: math.ceil(0.05 * len(files))]
  checksum = hashlib.sha256()
  for f in files:
    checksum.update(f.encode() + b"\0" + (rst_tree / f).read_bytes() + b"\0")

  # Read through plain TFDS by name, as any other TFDS dataset (no tensorflow needed).
  sources = tfds.data_source(python_docs.NAME, data_dir=str(docs_data_dir))
  got = {split: {ex["path"].decode(): ex["text"].decode() for ex in ds} for split, ds in sources.items()}
  assert sorted(got["validation"]) == sorted(held_out)
  assert sorted(got["train"]) == sorted(set(files) - set(held_out))
  assert got["train"]["about.rst.txt"] == (rst_tree / "about.rst.txt").read_text()
  info = tfds.builder(python_docs.NAME, data_dir=str(docs_data_dir)).info
  assert info.metadata["checksum"] == checksum.hexdigest()


def test_python_docs_detects_changed_sources(tmp_path, rst_tree):
  tree = tmp_path / "src"
  tree.mkdir()
  for f in rst_tree.rglob("*.txt"):
    (tree / f.relative_to(rst_tree)).parent.mkdir(parents=True, exist_ok=True)
    (tree / f.relative_to(rst_tree)).write_bytes(f.read_bytes())
  python_docs.prepare(str(tmp_path / "d"), source_dir=str(tree))
  python_docs.prepare(str(tmp_path / "d"), source_dir=str(tree))  # unchanged: fine, idempotent
  (tree / "about.rst.txt").write_text("edited")
  with pytest.raises(UserError, match="different"):
    python_docs.prepare(str(tmp_path / "d"), source_dir=str(tree))


def test_text_source_txt_and_jsonl(tiny_config, tmp_path):
  rng = np.random.default_rng(1)
  txt = {f"t{i}.txt": prose(rng, 1) for i in range(6)}
  for name, text in txt.items():
    (tmp_path / name).write_text(text)
  rows = [{"text": prose(rng, 1), "id": i} for i in range(14)]
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  tiny_config.data.update(source="text", text_glob=str(tmp_path / "**" / "*"), eval_fraction=0.1)
  source = sources.get_source(tiny_config)
  train, val = list(source.documents("train")), list(source.documents("validation"))
  assert len(val) == math.ceil(0.1 * 20) and len(train) == 18
  assert sorted(train + val) == sorted(list(txt.values()) + [r["text"] for r in rows])
  assert list(source.documents("validation")) == val  # fixed

  tiny_config.data.text_key = "body"
  with pytest.raises(UserError, match="no field 'body'"):
    list(sources.get_source(tiny_config).documents("train"))
  tiny_config.data.text_glob = str(tmp_path / "nothing*.txt")
  with pytest.raises(UserError, match="matches no files"):
    sources.get_source(tiny_config)


class ClaTestToyText(tfds.core.GeneratorBasedBuilder):
  """A toy TFDS text dataset, prepared in the test, read through data.source=tfds."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 5)}

  def _generate_examples(self, start, n):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
      yield i, {"body": f"doc{i} " + prose(rng, 1)}


def test_tfds_source_by_name(tiny_config, tmp_path):
  tiny_config.data.update(
      source="tfds", tfds_name="cla_test_toy_text", data_dir=str(tmp_path), text_key="body", eval_split="test"
  )
  with pytest.raises(UserError, match=r"not prepared.*python -m cla_jax\.cli\.prepare"):
    sources.get_source(tiny_config)
  tfds.display_progress_bar(False)
  ClaTestToyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = sources.get_source(tiny_config)
  docs = list(source.documents("train"))
  assert sorted(int(d.split()[0][3:]) for d in docs) == list(range(30))
  assert len(list(source.documents("test"))) == 5
  assert len(list(source.documents("train[:10]"))) == 10
  with pytest.raises(UserError, match="no split 'validation'"):
    list(source.documents("validation"))
  tiny_config.data.text_key = "text"
  with pytest.raises(UserError, match="no feature 'text'"):
    sources.get_source(tiny_config)


def test_tfds_unknown_name(tiny_config, tmp_path):
  tiny_config.data.update(source="tfds", tfds_name="no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(UserError, match="not a TFDS dataset"):
    sources.get_source(tiny_config)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_sentencepiece_trained_cached_and_round_trips(config, tok, rst_tree, tmp_path):
  text = (rst_tree / "library" / "mod3.rst.txt").read_text()
  ids = tok.encode(text)
  assert tok.decode(ids) == text  # exact, including newlines and reST indentation
  assert len(ids) < len(text) / 1.5  # it learned multi-character pieces
  assert tok.vocab_size <= config.model.vocab_size and 0 <= tok.eos_id < tok.vocab_size
  models = list(pathlib.Path(config.data.cache_dir, "tokenizers").glob("*.model"))
  assert len(models) == 1
  mtime = models[0].stat().st_mtime_ns
  again = tokenizer_lib.get_tokenizer(config)  # cached: loaded, not retrained
  assert again.checksum == tok.checksum and models[0].stat().st_mtime_ns == mtime

  config.data.tokenizer = str(models[0])  # an explicit .model path
  assert tokenizer_lib.get_tokenizer(config).encode(text) == ids
  config.data.tokenizer = str(tok.save(tmp_path))  # a copy kept in a workdir
  assert config.data.tokenizer.endswith("tokenizer.model") and tokenizer_lib.get_tokenizer(config).encode(text) == ids


def test_hf_tokenizer_json(tiny_config, tmp_path):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  rng = np.random.default_rng(2)
  hf.train_from_iterator(
      [prose(rng, 2) for _ in range(20)],
      trainers.BpeTrainer(
          vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
      ),
  )
  hf.save(str(tmp_path / "tokenizer.json"))
  tiny_config.data.tokenizer = str(tmp_path / "tokenizer.json")
  tok = tokenizer_lib.get_tokenizer(tiny_config)
  text = "Unseen text, with ünïcode → and  two spaces.\n  Indented."
  assert tok.decode(tok.encode(text)) == text
  assert tok.eos_id == hf.token_to_id("<|endoftext|>") and tok.vocab_size == hf.get_vocab_size()
  tiny_config.data.tokenizer = str(tok.save(tmp_path / "workdir"))
  assert tokenizer_lib.get_tokenizer(tiny_config).encode(text) == tok.encode(text)


def test_vocab_size_check_and_padding(config, tok):
  with pytest.raises(UserError, match="smaller than the tokenizer"):
    tokenizer_lib.fitted_vocab_size(tok, tok.vocab_size - 1, pad_vocab=False)
  assert tokenizer_lib.fitted_vocab_size(tok, tok.vocab_size + 5, pad_vocab=False) == tok.vocab_size + 5
  before = config.to_dict()
  assert tokenizer_lib.fitted_vocab_size(tok, 1, pad_vocab=True) == 128 * math.ceil(tok.vocab_size / 128)
  assert config.to_dict() == before  # returned, never written into a config


def test_missing_tokenizer_file(tiny_config):
  tiny_config.data.tokenizer = "/nonexistent/tok.model"
  with pytest.raises(UserError, match="no such file"):
    tokenizer_lib.get_tokenizer(tiny_config)


# ---------------------------------------------------------------------------------------------- batches


def reference_stream(config, tok, split):
  """The EOS-joined token stream, rebuilt from the documents with plain encode calls."""
  stream = []
  for doc in sources.get_source(config).documents(split):
    stream += tok.encode(doc) + [tok.eos_id]
  return np.array(stream)


def prepared_stream(config, tok, split):
  """The whole token stream of the prepared split, read back from its records."""
  data = prepare.open_split(config, tok, split, config.train.seq_len)
  return data.tokens(0, data.num_tokens), data


def test_prepared_split_matches_reference(config, tok):
  stream, data = prepared_stream(config, tok, "train")
  reference = reference_stream(config, tok, "train")
  assert data.dtype == np.uint16
  np.testing.assert_array_equal(stream, reference)
  seq_len = config.train.seq_len
  # Record r is window r: tokens [r * seq_len, r * seq_len + seq_len + 1); one shorter record holds the tail.
  assert data.num_windows == (len(reference) - 1) // seq_len
  for r, record in enumerate(data.records(range(data.num_records))):
    np.testing.assert_array_equal(record, reference[r * seq_len : r * seq_len + seq_len + 1])
  assert data.num_records == data.num_windows + (len(reference) - 1 > data.num_windows * seq_len)


def test_train_batches_cover_each_window_once_per_epoch(config, tok):
  batches = train_batches(config, tok)
  stream = reference_stream(config, tok, "train")
  seq_len, width = config.train.seq_len, config.train.batch_size
  num_windows = (len(stream) - 1) // seq_len
  assert batches.num_windows == num_windows
  starts = []
  for step in range(math.ceil(num_windows / width)):
    b = batches.batch(step)
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (width, seq_len)
    assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32 and (b["weights"] == 1).all()
    for inputs, targets in zip(b["inputs"], b["targets"]):
      # Locate the row in the reference stream: windows start at multiples of seq_len.
      matches = [
          s
          for s in range(0, num_windows * seq_len, seq_len)
          if (stream[s : s + seq_len] == inputs).all() and (stream[s + 1 : s + seq_len + 1] == targets).all()
      ]
      assert matches
      starts.append(matches[0])
  first_epoch = starts[:num_windows]
  assert sorted(first_epoch) == list(range(0, num_windows * seq_len, seq_len))


def test_deterministic_seeded_and_resumable(config, tok):
  a = train_batches(config, tok)
  b = train_batches(config, tok)
  for step in (0, 3, 1000):
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  # Resumption: the state is the step. An uninterrupted run vs one stopped after k batches and restarted.
  k = 5
  it = a.iterator(0)
  straight = [next(it) for _ in range(k + 4)]
  resumed_it = b.iterator(k)
  resumed = [next(resumed_it) for _ in range(4)]
  for x, y in zip(straight[k:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(straight[0]["inputs"], straight[1]["inputs"])
  config.data.seed = 1
  other = train_batches(config, tok)
  assert not np.array_equal(other.batch(0)["inputs"], a.batch(0)["inputs"])


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_together_give_the_one_host_batch(config, tok, hosts):
  config.data.packing = True
  single = train_batches(config, tok)
  parts = [train_batches(config, tok, process_index=p, process_count=hosts) for p in range(hosts)]
  for step in (0, 7, 123):
    whole = single.batch(step)
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p.batch(step)[key] for p in parts]), whole[key])
  config.train.batch_size = 6
  with pytest.raises(UserError, match="divisible by the number of hosts"):
    train_batches(config, tok, process_index=0, process_count=4)


def test_packing_features_by_hand():
  eos = 1
  inputs = np.array([[5, 6, 1, 7, 8, 9, 1, 1, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
  segment_ids, positions = batches_lib.packing_features(inputs, eos)
  np.testing.assert_array_equal(segment_ids, [[1, 1, 2, 2, 2, 2, 3, 4, 4], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])


def test_packed_batches_segments_follow_eos(config, tok):
  config.data.packing = True
  b = train_batches(config, tok).batch(2)
  for inputs, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
    expected_seg, expected_pos, current = [], [], 1  # plain loop reference
    for i, token in enumerate(inputs):
      if i > 0 and token == tok.eos_id:
        current += 1
      expected_seg.append(current)
      expected_pos.append(0 if i == 0 or token == tok.eos_id else expected_pos[-1] + 1)
    assert list(seg) == expected_seg and list(pos) == expected_pos


@pytest.mark.parametrize("max_tokens,hosts", [(100, 1), (0, 1), (0, 2)])
def test_eval_batches(config, tok, max_tokens, hosts):
  config.data.packing = True
  stream = reference_stream(config, tok, "validation")
  total = min(len(stream) - 1, max_tokens) if max_tokens else len(stream) - 1
  per_host = [
      list(
          batches_lib.eval_batches(
              prepare.open_split(config, tok, "validation", config.train.seq_len),
              4,
              config.train.seq_len,
              max_tokens,
              eos_id=tok.eos_id,
              packing=True,
              process_index=p,
              process_count=hosts,
          )
      )
      for p in range(hosts)
  ]
  batches = [{k: np.concatenate([h[i][k] for h in per_host]) for k in per_host[0][i]} for i in range(len(per_host[0]))]
  assert all(b["inputs"].shape == (4, config.train.seq_len) for b in batches)
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  weights = np.concatenate([b["weights"].reshape(-1) for b in batches])
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  assert weights.sum() == total and len(batches) == math.ceil(math.ceil(total / config.train.seq_len) / 4)
  np.testing.assert_array_equal(targets[weights == 1], stream[1 : total + 1])
  np.testing.assert_array_equal(inputs[weights == 1], stream[:total])
  segments = np.concatenate([b["segment_ids"].reshape(-1) for b in batches])
  assert (segments[weights == 0] == 0).all() and (segments[weights == 1] > 0).all()


def test_too_little_data_is_a_clear_error(config, tok):
  config.train.seq_len = 10**6
  with pytest.raises(UserError, match="fewer than train.seq_len"):
    train_batches(config, tok)


def test_prefetch_iterator_reraises(config, tok):
  batches = train_batches(config, tok)
  it = batches.iterator(-1)  # batch(-1) raises in the prefetch thread
  with pytest.raises(ValueError, match="step must be"):
    next(it)


def test_max_cache_tokens_caps_the_stream(config, tok, tmp_path):
  config.data.max_cache_tokens = 300
  stream, _ = prepared_stream(config, tok, "train")
  np.testing.assert_array_equal(stream, reference_stream(config, tok, "train")[:300])
  # Prepared in chunks of 2 documents, of which only those up to the cap are tokenized.
  source = sources.get_source(config)
  directory = tmp_path / "p" / "train"
  prepare.prepare_split(config, source, tok, "train", directory, seq_len=config.train.seq_len, docs_per_chunk=2)
  config.data.prepared_dir = str(tmp_path / "p")
  np.testing.assert_array_equal(prepared_stream(config, tok, "train")[0], stream)


# ---------------------------------------------------------------------------------------------- prepared splits


def text_corpus(directory: pathlib.Path, num_docs: int = 40) -> str:
  rng = np.random.default_rng(3)
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(num_docs):
    (directory / f"doc{i:03d}.txt").write_text(prose(rng, 1 + i % 3))
  return str(directory / "*.txt")


@pytest.fixture
def text_config(config, tmp_path_factory):
  """`config` on a local text corpus of 40 documents (tokenizer trained and cached once per test)."""
  corpus = tmp_path_factory.mktemp("corpus")
  config.data.update(source="text", text_glob=text_corpus(corpus), eval_fraction=0.1, cache_dir=str(corpus / "cache"))
  return config


def test_prepared_dir_batches_equal_pinned_order(text_config, tmp_path):
  """`prepare --output` (2 worker processes, several chunks and shards) trains to the order pinned here."""
  config = text_config
  tok = tokenizer_lib.get_tokenizer(config)
  out = tmp_path / "prepared"
  summary = prepare.prepare(config, str(out), num_workers=2, docs_per_chunk=7, records_per_shard=5)
  assert summary["train"]["windows"] > 10 and len(list((out / "train").glob("windows-*"))) > 2
  assert not (out / "train" / prepare.WORK_DIR).exists()  # intermediate chunks removed
  # Same bytes with one worker and the default chunking: the shards depend on the data only.
  again = tmp_path / "again"
  prepare.prepare(config, str(again), num_workers=1, docs_per_chunk=3, records_per_shard=5)
  for f in sorted((out / "train").iterdir()):
    assert (again / "train" / f.name).read_bytes() == f.read_bytes(), f.name

  config.data.prepared_dir = str(out)
  assert tokenizer_lib.get_tokenizer(config).checksum == tok.checksum  # the prepared dir's copy
  batches = train_batches(config, tok)
  # Independent pin of the order: global row r is window perm_{r // W}[r % W] of the plain-encoded stream.
  stream = reference_stream(config, tok, "train")
  seq_len, width = config.train.seq_len, config.train.batch_size
  num_windows = (len(stream) - 1) // seq_len
  for step in (0, 1, num_windows // width + 1):
    rows = step * width + np.arange(width)
    for row, inputs in zip(rows, batches.batch(step)["inputs"]):
      start = np.random.default_rng([config.data.seed, row // num_windows]).permutation(num_windows)[row % num_windows]
      np.testing.assert_array_equal(inputs, stream[start * seq_len : (start + 1) * seq_len])
  config.train.seq_len = 16
  with pytest.raises(UserError, match="seq_len=32, not 16"):
    train_batches(config, tok)
  config.data.prepared_dir = str(tmp_path / "missing")
  with pytest.raises(UserError, match="holds no tokenizer"):
    tokenizer_lib.get_tokenizer(config)


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("num_shards", [2, 3])
def test_prepare_on_k_hosts_writes_the_bytes_of_one_run(text_config, tmp_path, capsys, num_shards):
  """`prepare --shard=i --num_shards=k` on every host, then once more each, gives one run's files byte for byte."""
  one = tmp_path / "one"
  whole = prepare.prepare(text_config, str(one), docs_per_chunk=3, records_per_shard=4)
  many = tmp_path / "many"
  kwargs = dict(num_shards=num_shards, docs_per_chunk=3, records_per_shard=4)
  # First round: each host tokenizes its chunks; all but the last find other hosts' chunks missing.
  first = [prepare.prepare(text_config, str(many), shard=i, **kwargs) for i in range(num_shards)]
  assert first[0]["train"]["incomplete"] and "rerun once every shard's run has finished" in capsys.readouterr().out
  assert not (many / "train" / "index.json").exists()
  # Second round: every host writes its window shards; the one that finds all of them writes the index.
  second = [prepare.prepare(text_config, str(many), shard=i, **kwargs) for i in range(num_shards)]
  assert second[-1]["train"] == {**whole["train"], "dir": str(many / "train")}
  got, want = _tree_bytes(many), _tree_bytes(one)
  assert sorted(got) == sorted(want)
  assert sum(name.startswith("train/windows-") for name in want) > num_shards  # every host wrote some
  for name, data in want.items():
    assert got[name] == data, name


def test_two_hosts_read_disjoint_rows_and_only_their_shards(text_config, tmp_path):
  config = text_config
  tok = tokenizer_lib.get_tokenizer(config)
  prepare.prepare(config, str(tmp_path / "p"), docs_per_chunk=10, records_per_shard=3)
  config.data.prepared_dir = str(tmp_path / "p")
  step = 1
  whole = train_batches(config, tok)
  hosts = [train_batches(config, tok, process_index=p, process_count=2) for p in range(2)]
  parts = [h.batch(step) for h in hosts]
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole.batch(step)["inputs"])
  rows = [set(h.window_indices(step).tolist()) for h in hosts]
  assert not rows[0] & rows[1]
  for host, windows in zip(hosts, rows):
    # Records r live in shard r // 3: a host opens exactly the shards holding its rows, no other.
    opened = {int(pathlib.Path(p).name.split("-")[1]) for p in host.data.opened_shards()}
    assert opened == {w // 3 for w in windows}
    assert len(opened) < len(host.data.index["shards"])


_KILLED_PREPARE = """
import os, signal, sys
from cla_jax import config_lib
from cla_jax.data import prepare
calls = [0]
real = os.replace
def replace_then_die(src, dst):
  calls[0] += 1
  if calls[0] == int(sys.argv[2]):  # dies between writing a file and moving it into place
    os.kill(os.getpid(), signal.SIGKILL)
  real(src, dst)
os.replace = replace_then_die
config = config_lib.load("configs/default.py")
config.unlock()
config.data.update(source="text", text_glob=sys.argv[3], eval_fraction=0.1, cache_dir=sys.argv[4],
                   tokenizer=sys.argv[5])
config.model.vocab_size = 256
config.train.seq_len = 32
prepare.prepare(config, sys.argv[1], docs_per_chunk=4, records_per_shard=5)
"""


# The nth os.replace: 1 tokenizer, 2 plan, then 2 per train chunk (9 chunks), then window shards.
@pytest.mark.parametrize("die_at", [4, 25])  # in phase 1 (tokenizing), in phase 2 (writing window shards)
@pytest.mark.slow
def test_prepare_killed_midway_resumes_to_identical_shards(text_config, tmp_path, die_at):
  import subprocess
  import sys

  import train_helpers

  tok = tokenizer_lib.get_tokenizer(text_config)
  tok_path = tok.save(tmp_path / "tok")
  args = [text_config.data.text_glob, text_config.data.cache_dir, str(tok_path)]
  cmd = [sys.executable, "-c", _KILLED_PREPARE]
  killed = subprocess.run(
      cmd + [str(tmp_path / "a"), str(die_at)] + args,
      cwd=train_helpers.REPO_ROOT,
      env=train_helpers.env(),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert killed.returncode == -9, killed.stderr
  assert not (tmp_path / "a" / "train" / "index.json").exists()
  assert any((tmp_path / "a" / "train").glob("windows-*.array_record")) == (die_at == 25)
  for directory, die in ((tmp_path / "a", 0), (tmp_path / "b", 0)):  # resume; and an uninterrupted run
    done = subprocess.run(
        cmd + [str(directory), str(die)] + args,
        cwd=train_helpers.REPO_ROOT,
        env=train_helpers.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
  for split in ("train", "validation"):
    names = sorted(p.name for p in (tmp_path / "b" / split).iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a" / split).iterdir() if ".tmp" not in p.name)
    for name in names:
      assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- bad data input


def test_tokenizer_path_that_is_a_directory_or_not_a_tokenizer(tiny_config, tmp_path):
  tiny_config.data.tokenizer = str(tmp_path)
  with pytest.raises(UserError, match="is a directory") as e:
    tokenizer_lib.get_tokenizer(tiny_config)
  (tmp_path / "config.json").write_text('{"hidden_size": 64}')
  tiny_config.data.tokenizer = str(tmp_path / "config.json")
  with pytest.raises(UserError, match="not a Hugging Face tokenizer.json") as e:
    tokenizer_lib.get_tokenizer(tiny_config)
  assert "\n" not in str(e.value)


def test_binary_empty_and_tiny_vocab_corpora_get_their_own_hint(tiny_config, tmp_path):
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "a.txt").write_bytes(bytes(range(256)) * 8)
  tiny_config.data.update(source="text", text_glob=str(tmp_path / "bin" / "*.txt"), cache_dir=str(tmp_path / "c"))
  with pytest.raises(UserError, match=r"a\.txt is not UTF-8 text") as e:
    tokenizer_lib.get_tokenizer(tiny_config)
  assert "vocab_size" not in str(e.value)
  (tmp_path / "empty").mkdir()
  for i in range(3):
    (tmp_path / "empty" / f"{i}.txt").write_text("\n  \n")
  tiny_config.data.text_glob = str(tmp_path / "empty" / "*.txt")
  with pytest.raises(UserError, match="training text is empty") as e:
    tokenizer_lib.get_tokenizer(tiny_config)
  assert "vocab_size" not in str(e.value)
  (tmp_path / "ok").mkdir()
  for i in range(3):
    (tmp_path / "ok" / f"{i}.txt").write_text(prose(np.random.default_rng(i), 2))
  tiny_config.data.text_glob = str(tmp_path / "ok" / "*.txt")
  tiny_config.model.vocab_size = 0
  with pytest.raises(UserError, match="model.vocab_size=0 is too small"):
    tokenizer_lib.get_tokenizer(tiny_config)


def test_eval_fraction_zero_holds_out_nothing(tiny_config, tmp_path):
  for i in range(5):
    (tmp_path / f"{i}.txt").write_text(f"document {i}")
  tiny_config.data.update(source="text", text_glob=str(tmp_path / "*.txt"), eval_fraction=0.0)
  source = sources.get_source(tiny_config)
  assert source.num_documents("validation") == 0 and source.num_documents("train") == 5
  tiny_config.data.eval_fraction = 0.2
  assert sources.get_source(tiny_config).num_documents("validation") == 1


def test_prepare_refuses_bad_arguments(text_config, tmp_path):
  for kwargs, message in (
      ({"shard": 2, "num_shards": 2}, "--shard=2 must lie in"),
      ({"num_workers": 0}, "--num_workers=0 must be at least 1"),
  ):
    with pytest.raises(UserError, match=message):
      prepare.prepare(text_config, str(tmp_path / "p"), **kwargs)
  text_config.data.prepared_dir = str(tmp_path / "p")
  with pytest.raises(UserError, match="pass --output=DIR instead"):
    prepare.prepare(text_config, str(tmp_path / "q"))
  tok = tokenizer_lib.get_tokenizer(_without_prepared(text_config))
  with pytest.raises(UserError, match="has no prepared 'train' split"):
    train_batches(text_config, tok)


def test_shard_and_chunk_sizes_spread_work_and_bound_files():
  """At least MIN_SHARDS shards / MIN_CHUNKS chunks once a split is big enough, never a shard above the cap."""
  from cla_jax.data import writer

  record = 129 * 2  # seq_len 128, uint16
  for num_records in (1, 1000, writer.MIN_SHARD_BYTES * 100 // record, 10 * writer.MAX_SHARD_BYTES // record):
    per_shard = writer.records_per_shard(num_records, 128, np.dtype(np.uint16))
    num_shards = math.ceil(num_records / per_shard)
    assert per_shard * record <= writer.MAX_SHARD_BYTES
    if num_records * record >= writer.MIN_SHARDS * writer.MIN_SHARD_BYTES:
      assert num_shards >= writer.MIN_SHARDS, num_records
    else:  # small splits stay in few files of at least MIN_SHARD_BYTES
      assert num_shards == 1 or per_shard * record >= writer.MIN_SHARD_BYTES * 0.9
  for num_docs in (1, 10, 64 * 7 + 3, 10**7):
    size = prepare.chunk_size(num_docs)
    assert 1 <= size <= prepare.MAX_DOCS_PER_CHUNK
    assert math.ceil(num_docs / size) >= min(num_docs, prepare.MIN_CHUNKS)


def fail_on_task_3(task: int, **state) -> None:
  """A task for `prepare.Workers` (module level, so spawned helpers can run it) that fails for task 3."""
  if task == 3:
    raise RuntimeError(f"task {task} failed in process {os.getpid()}")


@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_run_every_task_and_reraise_a_failure(text_config, tmp_path, num_workers):
  tok = tokenizer_lib.get_tokenizer(text_config)
  workers = prepare.Workers(num_workers, sources.get_source(text_config), tok)
  try:
    out = tmp_path / "out"
    out.mkdir()
    tasks = [{"path": str(out / f"{i}.txt"), "text": str(i)} for i in range(20)]
    workers.map(write_text_task, tasks, uses_state=False)
    assert sorted(int(p.read_text()) for p in out.iterdir()) == list(range(20))
    with pytest.raises(RuntimeError, match="task 3 failed"):
      workers.map(fail_on_task_3, [{"task": i} for i in range(8)])
  finally:
    workers.close()


def write_text_task(path: str, text: str) -> None:
  """A task for `prepare.Workers`: writes `text` to `path`."""
  pathlib.Path(path).write_text(text)


def _without_prepared(config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.prepared_dir = ""
  return config


def test_data_modules_import_one_way():
  """Each cla_jax/data module imports only those listed before it in the package docstring; batches only reader."""
  import ast
  import re

  import cla_jax.data

  order = re.findall(r"^  (\w+)\s", cla_jax.data.__doc__, flags=re.M)
  directory = pathlib.Path(cla_jax.data.__file__).parent
  assert sorted(order) == sorted(p.stem for p in directory.glob("*.py") if p.stem != "__init__")
  for position, name in enumerate(order):
    tree = ast.parse((directory / f"{name}.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "cla_jax.data"
        for alias in node.names
    }
    imported |= {
        node.module.rsplit(".", 1)[1]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cla_jax.data.")
    }
    assert imported <= set(order[:position]), (name, imported - set(order[:position]))
    if name == "batches":  # the reader side: no writer, process pool or TFDS download behind a batch
      assert imported == {"reader"}, imported
