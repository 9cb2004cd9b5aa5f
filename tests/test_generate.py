"""KV-cached generation against independent references: the full forward pass, numpy sampling, 1 device."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_model import ATTENTION, PATTERNS, random_params, small_config

from cla_jax import decode, describe, kv_cache, sharding
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError
from cla_jax.model import ModelConfig
from tests import model_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every named pattern, and an explicit list (at 4 layers: groups {0}, {1, 2}, {3}).
PATTERN_LAYERS = [(p, 7) for p in PATTERNS] + [("1,2,1", 4)]


@functools.cache
def _jit_forward(cfg):
  return jax.jit(model_lib.Transformer(cfg).apply)


def _forward(cfg, params, tokens):
  return np.asarray(_jit_forward(cfg)({"params": params}, np.asarray(tokens)))


def _greedy_by_full_forward(cfg, params, prompt, new, forward=None):
  """The reference: the training forward over the whole sequence for every new token (no cache)."""
  forward = forward or (lambda tokens: _forward(cfg, params, tokens))
  seq = np.zeros((1, len(prompt) + new), np.int32)  # one shape, one compile; causal, so the tail is unseen
  seq[0, : len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + new):
    seq[0, n] = np.asarray(forward(seq))[0, n - 1].argmax()
  return seq[0, len(prompt) :].tolist()


def _teacher_forced(cfg, params, kv_cache_dtype="auto"):
  """(full forward logits, cached logits) of ragged prompts then teacher-forced steps, at the same tokens."""
  rng = np.random.default_rng(1)
  batch, total, lengths = 3, 9, np.array([2, 5, 1], np.int32)  # prompts of different lengths in one batch
  tokens = rng.integers(0, cfg.vocab_size, (batch, total)).astype(np.int32)
  full = _forward(cfg, params, tokens)
  # Right padding with junk after each row's prompt: the cache must never let it be seen.
  prompts = np.where(np.arange(total)[None] < lengths[:, None], tokens, cfg.vocab_size - 1)[:, : lengths.max()]
  rows = np.arange(batch)
  steps = total - lengths.max()

  @jax.jit
  def run(params, prompts, tokens):
    cache = kv_cache.init(cfg, batch, total + 2, kv_cache_dtype)
    _, first, cache = decode.prefill(
        params, prompts, lengths, cache, jax.random.key(0), cfg=cfg, sampling=decode.Sampling()
    )

    def step(cache, i):  # teacher forcing: feed every row its true next token
      pos = lengths + i
      logits, cache = decode.decode_step(params, tokens[rows, pos], pos, cache, cfg=cfg)
      return cache, logits

    return first, jax.lax.scan(step, cache, np.arange(steps))[1]

  first, stepped = run(params, prompts, tokens)
  expected = [full[rows, lengths - 1]] + [full[rows, lengths + i] for i in range(steps)]
  return np.stack(expected), np.concatenate([np.asarray(first)[None], np.asarray(stepped)])


@pytest.mark.fast_case("keep_ends-7-GQA")
@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("pattern, layers", PATTERN_LAYERS)
def test_teacher_forced_prefill_and_decode_equal_full_forward(pattern, layers, attention):
  heads, kv_heads = ATTENTION[attention]
  cfg = small_config(pattern=pattern, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)
  expected, got = _teacher_forced(cfg, random_params(cfg))
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("block", [2, 4, 5])
def test_cache_read_in_blocks_equals_full_forward(block, scan_layers, monkeypatch):
  # An 11-slot cache read 2, 4 or 5 slots at a time: several blocks, a last block moved back to end at the
  # cache's end (overlapping slots counted once), and blocks past a row's position that see nothing.
  monkeypatch.setattr(kv_cache, "DECODE_BLOCK", block)
  cfg = small_config(pattern="keep_ends", num_layers=5, num_heads=4, num_kv_heads=2, scan_layers=scan_layers)
  expected, got = _teacher_forced(cfg, random_params(cfg))
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["none", "cla2", "keep_ends"])
def test_int8_cache_stays_near_the_full_forward(pattern):
  # Every key and value is quantised when written: logits move by far less than they span.
  cfg = small_config(pattern=pattern, num_layers=5, num_heads=4, num_kv_heads=2)
  expected, got = _teacher_forced(cfg, random_params(cfg), "int8")
  error = np.abs(got - expected).max() / np.abs(expected).max()
  assert 0 < error < 0.02, error


def _nll(logits, targets):
  logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
  )
  return -np.take_along_axis(logp, targets[..., None], -1).mean()


@pytest.mark.slow
def test_teacher_forced_perplexity_through_the_cache():
  cfg = small_config(pattern="cla2", num_layers=4, num_heads=4, num_kv_heads=1)
  params = random_params(cfg, seed=7, std=0.1)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  reference = _nll(_forward(cfg, params, inputs).astype(np.float64), targets)
  run = jax.jit(decode.teacher_forced_logits, static_argnames=("cfg", "prefill_len", "kv_cache_dtype"))
  cached = {
      d: _nll(np.asarray(run(params, inputs, cfg=cfg, prefill_len=6, kv_cache_dtype=d), np.float64), targets)
      for d in ("auto", "int8")
  }
  np.testing.assert_allclose(cached["auto"], reference, rtol=1e-6)
  # int8: perplexity within 0.5% of the unquantised cache's (the bound the README's measurement meets).
  assert abs(np.exp(cached["int8"] - cached["auto"]) - 1) < 5e-3


def _decode_loop_bytes(cfg, batch, length):
  """Bytes of the compiled decode loop on one device."""
  return model_helpers.decode_loop_bytes(decode.Decoder(cfg, sharding.single_device_mesh()), batch, length)


def test_decode_step_memory_is_the_cache_and_params_not_a_copy_of_a_group():
  # The README's tiny H128 rows: what one more sequence costs is its cache and a few blocks of scores,
  # not a copy of its group's [max_length, k, h] (as large as an MQA layer's cache), and a two-layer CLA
  # group's weights are not all held at once.
  widths = dict(num_layers=4, d_model=256, num_heads=16, num_kv_heads=1, head_dim=16, mlp_dim=684)
  length, per_sequence, fixed = 1024, {}, {}
  for pattern in ("none", "cla2"):
    cfg = ModelConfig(**widths, pattern=pattern, vocab_size=2048, dtype="float32")
    one, two = _decode_loop_bytes(cfg, 1, length), _decode_loop_bytes(cfg, 2, length)
    cache = kv_cache.bytes_per_token(cfg) * length
    per_sequence[pattern] = (two - one) / cache
    fixed[pattern] = one - cache
  assert per_sequence["cla2"] < 1.1 and per_sequence["none"] < 1.05, per_sequence
  assert fixed["cla2"] <= fixed["none"], fixed


@pytest.mark.slow
def test_greedy_generate_equals_recomputing_the_full_forward():
  cfg = small_config(pattern="keep_ends", num_heads=4, num_kv_heads=1)
  params = random_params(cfg, seed=3)
  prompts = [[5, 9, 11, 3, 40], [7], [12, 1, 60]]
  new = 6
  got = decode.generate(params, cfg, prompts, max_new_tokens=new)
  for prompt, row in zip(prompts, got):
    assert row == _greedy_by_full_forward(cfg, params, prompt, new)


def test_generation_stops_at_eos():
  cfg = small_config(pattern="cla2")
  params = random_params(cfg, seed=3)
  prompt = [[5, 9, 11]]
  free = decode.generate(params, cfg, prompt, max_new_tokens=8)[0]
  eos = free[3]
  stopped = decode.generate(params, cfg, prompt, max_new_tokens=8, eos_id=eos)[0]
  assert stopped == free[: free.index(eos) + 1]


@pytest.mark.parametrize("pattern, ratio", [("none", (1, 1)), ("cla2", (1, 2)), ("keep_ends", (11, 20))])
def test_cache_bytes_equal_describe_and_the_paper_ratios(pattern, ratio):
  # 20 layers like the paper's 1B rows, tiny widths: MQA with head_dim 8.
  cfg = ModelConfig(
      num_layers=20,
      d_model=16,
      num_heads=2,
      num_kv_heads=1,
      head_dim=8,
      mlp_dim=16,
      vocab_size=32,
      pattern=pattern,
      dtype="float32",
  )
  mqa = ModelConfig(**{**cfg.__dict__, "pattern": "none"})
  batch, max_length = 3, 32  # whole cache rows: 16 tokens of head_dim 8 share one 128-lane row
  cache = kv_cache.init(cfg, batch, max_length)
  measured = sum(a.nbytes for a in jax.tree.leaves(cache))
  per_token = describe.describe(cfg)["kv_bytes_per_token"]  # 16-bit bytes; this cache is fp32
  assert measured == per_token * batch * max_length * 4 // describe.KV_BYTES_PER_ELEMENT
  mqa_bytes = sum(a.nbytes for a in jax.tree.leaves(kv_cache.init(mqa, batch, max_length)))
  assert measured * ratio[1] == mqa_bytes * ratio[0]
  assert {a.dtype for a in jax.tree.leaves(cache)} == {np.dtype("float32")}


@pytest.mark.slow
def test_eight_devices_generate_the_same_tokens_as_one():
  cfg = small_config(pattern="cla2", num_heads=4, num_kv_heads=2, vocab_size=64)
  params = random_params(cfg, seed=5)
  mesh8 = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sharding.check_model_fits(cfg, mesh8)
  prompts = [[5, 9, 11, 3], [7], [12, 1, 60]]
  # Sampled (not greedy): the draws as well as the logits must match across meshes.
  kwargs = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=4)
  one = decode.generate(params, cfg, prompts, **kwargs)
  eight = decode.generate(params, cfg, prompts, mesh=mesh8, **kwargs)
  assert decode.cached_decoder(cfg, mesh8, decode.Sampling(0.9, 20, 0.9)).cache_sharding[0][0].spec[2] == "tensor"
  assert one == eight


def _reference_filter(logits, top_k, top_p):
  """The filtered distribution by the definition: keep the k largest, then the smallest nucleus >= p."""
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  keep = order[:top_k] if top_k else order
  kept = probs[keep] / probs[keep].sum()
  cut = np.searchsorted(np.cumsum(kept), top_p - 1e-12) + 1  # first prefix whose mass reaches p
  keep = keep[:cut]
  out = np.zeros_like(probs)
  out[keep] = probs[keep] / probs[keep].sum()
  return out


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (8, 0.5), (1, 1.0), (0, 0.01)])
def test_top_k_top_p_filter_equals_numpy_and_sampling_follows_it(top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (4, 30)).astype(np.float32)
  filtered = np.asarray(jax.nn.softmax(decode.filter_logits(logits, top_k, top_p)))
  for row in range(4):
    np.testing.assert_allclose(filtered[row], _reference_filter(logits[row], top_k, top_p), atol=1e-6)
  # 20k draws of row 0 (one per batch row): only the support appears, at the reference frequencies.
  draws = np.asarray(
      decode.sample(np.repeat(logits[:1], 20000, 0), jax.random.key(1), decode.Sampling(1.0, top_k, top_p))
  )
  expected = _reference_filter(logits[0], top_k, top_p)
  assert set(np.unique(draws)) <= set(np.flatnonzero(expected))
  np.testing.assert_allclose(np.bincount(draws, minlength=30) / draws.size, expected, atol=0.015)


@pytest.mark.slow
def test_sampling_is_reproducible_per_seed():
  cfg = small_config(pattern="cla2")
  params = random_params(cfg, seed=3)
  prompts = [[5, 9, 11], [2]]
  kwargs = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
  a = decode.generate(params, cfg, prompts, seed=1, **kwargs)
  assert a == decode.generate(params, cfg, prompts, seed=1, **kwargs)
  assert a != decode.generate(params, cfg, prompts, seed=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[1, 99]]), r"outside \[0, 61\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_k=-2), "top_k must be"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(max_length=6), r"needs 7 cache positions but the limit is 6.*at most 3"),
        (dict(kv_cache_dtype="fp8"), r"kv_cache_dtype must be one of \('auto', 'int8'\)"),
    ],
)
def test_bad_requests_are_one_line_errors(kwargs, message):
  cfg = small_config()
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
  args.update(kwargs)
  with pytest.raises(UserError, match=message):
    decode.generate(None, cfg, args.pop("prompts"), **args)


# ---------------------------------------------------------------------------------------------------------
# The workdir API and the CLI.
# ---------------------------------------------------------------------------------------------------------

_WORDS = "the cat sat on a mat while old dogs ran far away from big red barns near green hills".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A params-only workdir of a random tiny model with its 256-piece sentencepiece tokenizer."""
  import train_helpers  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("gen")
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(_WORDS, 60)) for _ in range(40)]
  spm = root / "spm.model"
  spm.write_bytes(tokenizer_lib.train_sentencepiece(texts, 256))
  config = train_helpers.tiny_config()
  config.data.update(source="text", text_glob=str(root / "*.txt"), tokenizer=str(spm))
  config.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
  cfg = model_lib.ModelConfig.from_config(config.model)
  path = str(root / "run")
  workdir_lib.save_params_only(path, random_params(cfg, seed=2), config, step=3)
  tokenizer_lib.get_tokenizer(config).save(path)
  return path


def test_load_model_generate_strings_and_ids(workdir):
  import cla_jax  # pylint: disable=g-import-not-at-top

  model = cla_jax.load_model(workdir)
  texts = model.generate(["the cat sat", "green hills near"], max_new_tokens=5)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  tok = model.tokenizer
  ids = [[tok.eos_id] + tok.encode("the cat sat"), [tok.eos_id] + tok.encode("green hills near")]
  new_ids = model.generate(ids, max_new_tokens=5)
  assert texts == [tok.decode([t for t in row if t != tok.eos_id and t < tok.vocab_size]) for row in new_ids]
  # Ids in: the same as recomputing the loaded model's full forward for every token.
  reference = _greedy_by_full_forward(None, None, ids[0], 5, forward=model)
  assert new_ids[0] == reference[: len(new_ids[0])]
  with pytest.raises(UserError, match="limit is 32"):
    model.generate(ids, max_new_tokens=200)


def _cli(workdir, *flags):
  import train_helpers  # pylint: disable=g-import-not-at-top

  return subprocess.run(
      [sys.executable, "generate.py", f"--workdir={workdir}", *flags],
      cwd=REPO,
      env=train_helpers.env(),
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.slow
def test_cli_prints_continuations(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the cat sat\n\nold dogs ran\n")  # blank lines are skipped
  out = _cli(
      workdir,
      "--prompt=green hills",
      f"--prompt_file={prompts}",
      "--max_new_tokens=4",
      "--temperature=0.8",
      "--num_samples=2",
      "--seed=3",
      "--jsonl",
  )
  assert out.returncode == 0, out.stderr
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["prompt"] for r in records] == ["green hills"] * 2 + ["the cat sat"] * 2 + ["old dogs ran"] * 2
  assert [r["sample"] for r in records] == [0, 1] * 3
  assert all(isinstance(r["continuation"], str) for r in records)
  text = _cli(workdir, "--prompt=green hills", "--max_new_tokens=3")
  assert text.returncode == 0 and text.stdout.startswith("[prompt 1]\ngreen hills"), text.stdout + text.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt=x", "--step=99"], "step 99"),
        (["--prompt="], "prompt is empty"),
        ([], "give --prompt"),
        (["--prompt_file=/nonexistent.txt"], "no such file"),
        (["--prompt=x", "--num_samples=0"], "num_samples must be"),
        (["--prompt=the cat", "--max_new_tokens=500"], "the limit is 32"),
        (["--prompt=the cat", "--top_p=2"], "top_p must lie in"),
        (["--prompt=the cat", "--kv_cache_dtype=fp8"], "kv_cache_dtype must be one of"),
    ],
)
def test_cli_one_line_errors(workdir, flags, message):
  out = _cli(workdir, *flags)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
  assert message in out.stderr


@pytest.mark.slow
def test_load_model_on_a_mesh_restores_shards_and_decodes_int8(workdir):
  import cla_jax  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = cla_jax.load_model(workdir, mesh=mesh, kv_cache_dtype="int8")
  expected = sharding.logical_shardings(model_lib.abstract_params(model.model_config), mesh)
  split = 0
  for x, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(expected)):
    # Read straight into the mesh's shards: each device holds only its shard, never the whole array.
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    assert {s.data.shape for s in x.addressable_shards} == {want.shard_shape(x.shape)}
    split += want.shard_shape(x.shape) != x.shape
  assert split > 0
  replicated = cla_jax.load_model(workdir)
  ids = [[5, 9, 11, 3], [7]]
  assert model.generate(ids, max_new_tokens=5) == replicated.generate(ids, max_new_tokens=5, kv_cache_dtype="int8")
  assert model._sharded_params is model.params  # decoding uses the restored shards as they are


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology=v9-8"], "unknown TPU topology 'v9-8'"),
        (["--rows=H128-MQA-int4"], "unknown 1B paper row 'H128-MQA-int4'"),
    ],
)
def test_decode_benchmark_one_line_errors(flags, message):
  import train_helpers  # pylint: disable=g-import-not-at-top

  out = subprocess.run(
      [sys.executable, "benchmarks/decode.py", "--memory_only", *flags],
      cwd=REPO,
      env=train_helpers.env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
  assert message in out.stderr


@pytest.mark.slow
def test_cli_bad_workdir(tmp_path):
  out = _cli(tmp_path / "nothing", "--prompt=x")
  assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
