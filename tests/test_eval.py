"""eval: loss against an independent numpy forward, rolling windows by hand, device-count invariance, errors."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cla_jax import config_lib, evaluate, sharding
from cla_jax import workdir as workdir_lib
from cla_jax.data import batches as batches_lib
from cla_jax.data import prepare
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError
from tests import model_helpers, numpy_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the cat sat on a mat while old dogs ran far away from big red barns near green hills and "
    "small birds sang loud songs in tall trees every morning"
).split()

# A wikitext-style file: two pages, a sub-heading inside the first, wikitext's tokenized spelling.
WIKI = (
    " \n = Alpha Page = \n \n The cat sat on a mat , and 1 @,@ 000 dogs ran . \n \n"
    " = = History = = \n \n Old dogs ran far away ( near green hills ) . \n"
    " = Beta Page = \n \n Small birds sang loud songs in tall trees every morning . \n"
)


def _corpus(seed: int, n_docs: int, n_words: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, n_words)) + " .\n" for _ in range(n_docs)]


def _nll_numpy(params, config, inputs, targets, weights) -> float:
  """Summed weighted next-token NLL from the numpy reference forward (float64)."""
  m = config.model
  logits = numpy_reference.forward(
      params,
      np.asarray(inputs)[None],
      norm_kind=m.norm,
      eps=m.norm_eps,
      theta=m.rope_theta,
      tie_embeddings=m.tie_embeddings,
  )[0]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-(logp[np.arange(len(targets)), targets] * np.asarray(weights)).sum())


def _random_params(config, seed=1):
  """Random weights for the config's param shapes (numpy: much faster than compiling the model's init)."""
  return model_helpers.random_params(config_lib.model_config(config), seed=seed, std=0.05)


@pytest.fixture
def setup(tiny_config, tmp_path):
  """A params-only workdir of a random tiny model, a small text corpus and a 256-piece sentencepiece model."""
  data = tmp_path / "data"
  data.mkdir()
  for i, doc in enumerate(_corpus(0, 24, 60)):
    (data / f"doc{i:02d}.txt").write_text(doc)
  spm = tmp_path / "spm.model"
  spm.write_bytes(tokenizer_lib.train_sentencepiece(_corpus(1, 50, 80) + [WIKI], 256))
  config = tiny_config
  config.data.update(
      source="text",
      text_glob=str(data / "*.txt"),
      tokenizer=str(spm),
      data_dir=str(tmp_path / "cache"),
      eval_fraction=0.25,
  )
  config.eval.update(batch_size=4, max_tokens=200)
  params = _random_params(config)
  workdir = str(tmp_path / "run")
  workdir_lib.save_params_only(workdir, params, config, step=7)
  wiki = tmp_path / "wiki.test.raw"
  wiki.write_text(WIKI)
  return workdir, config, params, str(wiki)


def test_rolling_windows_by_hand():
  # 10 tokens, windows of 4, prefix 99: predict [0:4] from the prefix, [4:8] from one token of context,
  # then [8:10] with the window filled back to 4 tokens, the first two context only.
  windows = evaluate.rolling_windows(list(range(10)), 4, 99)
  got = [(w.inputs.tolist(), w.targets.tolist(), w.weights.tolist()) for w in windows]
  assert got == [
      ([99, 0, 1, 2], [0, 1, 2, 3], [1, 1, 1, 1]),
      ([3, 4, 5, 6], [4, 5, 6, 7], [1, 1, 1, 1]),
      ([5, 6, 7, 8], [6, 7, 8, 9], [0, 0, 1, 1]),
  ]
  # Shorter than a window: one window; every token predicted exactly once in general.
  assert [w.inputs.tolist() for w in evaluate.rolling_windows([5, 6], 4, 0)] == [[0, 5]]
  for n in (1, 7, 8, 9, 33):
    scored = np.concatenate([w.targets[w.weights > 0] for w in evaluate.rolling_windows(list(range(n)), 8, -1)])
    assert scored.tolist() == list(range(n))


def test_wikitext_documents_words_and_detokenizer():
  docs = evaluate.split_documents(WIKI)
  assert [d.splitlines()[0] for d in docs] == [" = Alpha Page = ", " = Beta Page = "]  # sub-heading stays inside
  assert "".join(docs) == WIKI[len(" \n") :]  # only the blank preamble is dropped
  # Harness rule len(re.split(r"\s+", doc)): tokens plus one empty string at each whitespace end.
  assert evaluate.count_words(" a b\n c \n") == 5
  assert evaluate.count_bytes("é a") == 4
  assert evaluate.split_documents("no headings\nhere\n") == ["no headings\nhere\n"]
  assert evaluate.split_documents("x\n = T = \ny\n", "plain") == ["x\n = T = \ny\n"]
  assert evaluate.wikitext_detokenize(" = = History = = \n \n The cat , 1 @,@ 000 well @-@ known ( near ) . \n") == (
      " == History ==\n\nThe cat, 1,000 well-known (near).\n"
  )


def test_text_file_equals_hand_computed_windows(setup):
  workdir, config, params, wiki = setup
  result = evaluate.run(workdir, text_file=wiki, max_length=8, batch_size=3, progress=False)
  tok = tokenizer_lib.get_tokenizer(config)
  docs = evaluate.split_documents(open(wiki).read())
  nll = tokens = 0
  for doc in docs:
    ids = tok.encode(evaluate.wikitext_detokenize(doc))
    assert len(ids) > 16  # several windows per document, the last one partial or full
    # Hand-made windows: the first predicts ids[0:8] from EOS + ids[0:7]; window k predicts ids[8k:8k+8]
    # from the 8 tokens before each prediction.
    nll += _nll_numpy(params, config, [tok.eos_id] + ids[:7], ids[:8], np.ones(8))
    for first in range(8, len(ids), 8):
      end = min(first + 8, len(ids))
      inputs, targets = ids[end - 9 : end - 1], ids[end - 8 : end]
      nll += _nll_numpy(params, config, inputs, targets, np.arange(end - 8, end) >= first)
    tokens += len(ids)
  words = sum(len(re.split(r"\s+", d)) for d in docs)
  num_bytes = len(WIKI[len(" \n") :].encode())
  assert (result["tokens"], result["words"], result["bytes"], result["documents"]) == (tokens, words, num_bytes, 2)
  np.testing.assert_allclose(result["loss"] * result["tokens"], nll, rtol=2e-5)
  np.testing.assert_allclose(result["word_perplexity"], math.exp(nll / words), rtol=2e-5)
  np.testing.assert_allclose(result["byte_perplexity"], math.exp(nll / num_bytes), rtol=2e-5)
  np.testing.assert_allclose(result["bits_per_byte"], nll / num_bytes / math.log(2), rtol=2e-5)
  saved = json.loads(open(os.path.join(workdir, "eval", "wiki_test_step7.json")).read())
  assert saved == result and result["step"] == 7


def test_split_loss_equals_numpy_reference(setup):
  workdir, config, params, _ = setup
  result = evaluate.run(workdir, max_tokens=100, progress=False)
  tok = tokenizer_lib.get_tokenizer(config)
  nll = tokens = 0.0
  data = prepare.open_split(config, tok, "validation", config.train.seq_len)
  for batch in batches_lib.eval_batches(
      data, 8, config.train.seq_len, 100, eos_id=tok.eos_id, packing=False, process_index=0, process_count=1
  ):
    for row in range(len(batch["inputs"])):
      assert "segment_ids" not in batch
      nll += _nll_numpy(params, config, batch["inputs"][row], batch["targets"][row], batch["weights"][row])
      tokens += batch["weights"][row].sum()
  assert 0 < result["tokens"] == tokens <= 100
  np.testing.assert_allclose(result["loss"], nll / tokens, rtol=2e-5)
  np.testing.assert_allclose(result["perplexity"], math.exp(nll / tokens), rtol=2e-5)
  assert result["split"] == config.data.eval_split and result["step"] == 7


@pytest.mark.slow
def test_one_and_eight_devices_agree(setup):
  workdir, _, _, wiki = setup
  assert jax.device_count() == 8
  run = lambda **kw: evaluate.run(workdir, batch_size=8, progress=False, write=False, **kw)
  # Rolling windows: 1 device vs data=8.
  one, eight = run(text_file=wiki, max_length=8, num_devices=1), run(text_file=wiki, max_length=8)
  assert one["tokens"] == eight["tokens"] > 0
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
  # Validation split: 1 device vs data=2 x fsdp=2 x tensor=2 given on the command line (params sharded 4 ways).
  one, sharded = run(max_tokens=150, num_devices=1), run(max_tokens=150, overrides={"mesh.fsdp": 2, "mesh.tensor": 2})
  assert one["tokens"] == sharded["tokens"] > 0
  np.testing.assert_allclose(sharded["loss"], one["loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "mesh, why",
    [
        ({"mesh.data": 4, "mesh.fsdp": 4, "mesh.num_devices": 16}, "mesh.num_devices=16 must be -1 (all) or between"),
        ({"mesh.data": 1, "mesh.tensor": 8}, "model.num_heads=4 is not divisible by mesh.tensor=8"),
    ],
    ids=["more_devices_than_here", "model_does_not_divide"],
)
def test_a_mesh_that_does_not_fit_here_falls_back_to_data_parallelism(setup, capfd, monkeypatch, mesh, why):
  """A checkpoint trained on a pod still evaluates on one host: data parallelism over every device, one note."""
  workdir = setup[0]
  run = lambda **kw: evaluate.run(workdir, batch_size=8, max_tokens=150, progress=False, write=False, **kw)  # noqa: E731
  one = run(num_devices=1)
  meshes = []
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda *a, **kw: meshes.append(make_mesh(*a, **kw)) or meshes[-1])
  capfd.readouterr()
  got = run(overrides=mesh)
  note = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: ")]
  assert len(note) == 1 and why in note[0] and note[0].endswith("Evaluating with pure data parallelism instead."), note
  assert dict(meshes[-1].shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert got["tokens"] == one["tokens"] > 0
  np.testing.assert_allclose(got["loss"], one["loss"], rtol=1e-5)


def test_bad_workdir_step_and_config_errors(setup, tmp_path):
  workdir, config, _, _ = setup
  with pytest.raises(UserError, match="does not exist"):
    evaluate.run(str(tmp_path / "nope"))
  with pytest.raises(UserError, match=r"no checkpoint for step 3 .*available steps: \[7\]"):
    evaluate.run(workdir, step=3)
  with pytest.raises(UserError, match="cannot be changed at evaluation"):
    evaluate.run(workdir, overrides={"model.d_model": 128})
  empty = tmp_path / "empty"
  workdir_lib.write_config(empty, config)
  with pytest.raises(UserError, match="no checkpoints"):
    evaluate.run(str(empty))
  # A config.json that no longer matches the checkpoint's shapes.
  mismatched = json.loads(open(os.path.join(workdir, "config.json")).read())
  mismatched["model"]["mlp_dim"] = 96
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(mismatched, f)
  with pytest.raises(UserError, match="does not match the model config"):
    evaluate.run(workdir)


@pytest.mark.slow
def test_cli_prints_table_then_json_and_one_line_errors(setup):
  workdir, _, _, wiki = setup
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
      sys.executable,
      "eval.py",
      f"--workdir={workdir}",
      f"--text_file={wiki}",
      "--max_length=8",
      "--config.mesh.tensor=2",
      "--noprogress",
  ]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert {
      "word_perplexity",
      "byte_perplexity",
      "bits_per_byte",
      "token_perplexity",
      "step",
      "tokens",
      "workdir",
  } <= set(result)
  assert any(line.startswith("word_perplexity") for line in lines[:-1])
  bad = subprocess.run(
      [sys.executable, "eval.py", f"--workdir={workdir}", "--step=99"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
  assert bad.stderr.strip().splitlines() == [
      f"error: no checkpoint for step 99 in {workdir}/checkpoints; " "available steps: [7]."
  ]
