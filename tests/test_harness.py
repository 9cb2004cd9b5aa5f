"""LM-Eval-Harness model: log-likelihoods against the loaded model's own logits, eval.py's rolling perplexity,
local offline tasks through simple_evaluate and the wrapper CLI, and 1 vs 8 devices."""

import functools
import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import cla_jax  # noqa: E402
import cla_jax.load  # noqa: E402
from cla_jax import config_lib, evaluate  # noqa: E402
from cla_jax import model as model_lib  # noqa: E402
from cla_jax import workdir as workdir_lib  # noqa: E402
from cla_jax.cli import harness as harness_command  # noqa: E402
from cla_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from cla_jax.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The harness must never reach the Hugging Face hub: every task here is local.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MAX_LENGTH = 16
WORDS = (
    "the cat sat on a mat while old dogs ran far away from big red barns near green hills and "
    "small birds sang loud songs in tall trees every morning"
).split()
TEXT = (
    "the cat sat on a mat while old dogs ran far away from big red barns.\n"
    "small birds sang loud songs in tall trees every morning near green hills.\n"
)
MC_DOCS = [
    {"question": "the cat sat on", "choices": ["a mat", "big red barns", "tall trees"], "answer": 0},
    {"question": "old dogs ran", "choices": ["far away", "loud songs", "the cat"], "answer": 0},
    {"question": "small birds sang", "choices": ["green hills", "loud songs"], "answer": 1},
    {"question": "every morning the", "choices": ["cat", "dogs", "birds", "mat"], "answer": 2},
    {"question": "near green", "choices": ["hills", "barns", "trees"], "answer": 0},
    {"question": "a mat while", "choices": ["old dogs ran", "small birds sang"], "answer": 1},
]
GEN_DOCS = [
    {"prompt": "the cat sat on", "answer": " a mat"},
    {"prompt": "small birds", "answer": " sang"},
    {"prompt": "old dogs ran far", "answer": " away"},
]


def _task_files(directory) -> str:
  """Three local tasks (multiple choice, rolling perplexity, generation) over JSONL files: no downloads."""
  os.makedirs(directory, exist_ok=True)

  def write(name, docs, yaml_body):
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
      f.write(
          f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
          f"test_split: test\n{yaml_body}"
      )

  write(
      "cla_local_mc",
      MC_DOCS,
      'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
      'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
  )
  write(
      "cla_local_text",
      [{"text": TEXT}],
      'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
      'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n'
      "  - metric: bits_per_byte\n",
  )
  write(
      "cla_local_gen",
      GEN_DOCS,
      'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
      'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
      "metric_list:\n  - metric: exact_match\n",
  )
  return str(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A params-only workdir of a random tiny model with its own small sentencepiece tokenizer, and local tasks."""
  from tests import train_helpers  # pylint: disable=g-import-not-at-top

  # Offline for this module's tests only: a session-wide setting would hide a hub call in later modules.
  with pytest.MonkeyPatch.context() as env:
    for key, value in OFFLINE.items():
      env.setenv(key, value)
    tmp = tmp_path_factory.mktemp("harness")
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 80)) + ".\n" for _ in range(60)] + [TEXT]
    spm = tmp / "spm.model"
    spm.write_bytes(tokenizer_lib.train_sentencepiece(corpus, 256))
    config = train_helpers.tiny_config()
    config.data.update(tokenizer=str(spm))
    # The model's vocabulary is exactly the tokenizer's, so that every argmax decodes.
    config.model.vocab_size = tokenizer_lib.get_tokenizer(config).vocab_size
    config.eval.update(batch_size=8)
    shapes = nn.meta.unbox(model_lib.abstract_params(config_lib.model_config(config)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + rng.normal(0, 0.3, s.shape)).astype(
            np.float32
        ),
        shapes,
    )
    workdir = str(tmp / "run")
    workdir_lib.save_params_only(workdir, params, config, step=3)
    from cla_jax import harness  # pylint: disable=g-import-not-at-top

    lm = harness.CLAHarnessLM(workdir=workdir, max_length=MAX_LENGTH, progress=False)
    yield {
        "workdir": workdir,
        "tmp": tmp,
        "lm": lm,
        "tokenizer": tokenizer_lib.get_tokenizer(config),
        "model": cla_jax.load_model(workdir),
        "tasks": _task_files(tmp / "tasks"),
    }


def _log_probs(model, ids) -> np.ndarray:
  """float64 log-softmax of the loaded model's logits for one sequence (right-padded to one shape: causal)."""
  padded = np.zeros((1, MAX_LENGTH), np.int32)
  padded[0, : len(ids)] = ids
  logits = np.asarray(model(padded))[0, : len(ids)].astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _reference(setup, context, continuation):
  """(log-prob, is-greedy) by hand: the harness's split rule, left truncation, log-softmax of model(tokens)."""
  tok, model = setup["tokenizer"], setup["model"]
  spaces = len(context) - len(context.rstrip())
  if spaces:  # trailing spaces of a context belong to the continuation
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if context:
    context_ids = tok.encode(context)
    continuation_ids = tok.encode(context + continuation)[len(context_ids) :]
  else:
    context_ids, continuation_ids = [tok.eos_id], tok.encode(continuation)
  seq = (context_ids + continuation_ids)[-(MAX_LENGTH + 1) :]
  log_probs = _log_probs(model, seq[:-1])
  positions = range(len(seq) - 1 - len(continuation_ids), len(seq) - 1)
  return (sum(log_probs[p, seq[p + 1]] for p in positions), all(log_probs[p].argmax() == seq[p + 1] for p in positions))


def _greedy_pair(setup):
  """A (context, continuation) whose continuation is the model's greedy choice, token by token."""
  tok, model = setup["tokenizer"], setup["model"]
  for context in ("the cat sat on", "old dogs", "small birds sang loud", "every morning", "a mat"):
    ids = tok.encode(context)
    for _ in range(2):
      ids.append(int(_log_probs(model, ids)[-1].argmax()))
    continuation = tok.decode(ids[-2:])
    if continuation.strip() and tok.encode(context + continuation) == ids:
      return context, continuation
  raise AssertionError("no context whose greedy continuation round-trips through the tokenizer")


def _requests(kind, args):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top

  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _pairs(setup):
  long_context = " ".join(WORDS[:30])  # far more than MAX_LENGTH tokens: truncated from the left
  return [
      ("the cat sat on", " a mat"),
      ("old dogs ran ", "far away"),
      ("", "small birds sang"),
      (long_context, " every morning"),
      ("near green", " hills and tall trees"),
      _greedy_pair(setup),
  ]


def test_loglikelihood_equals_log_softmax_of_loaded_model(setup):
  pairs = _pairs(setup)
  assert len(setup["tokenizer"].encode(pairs[3][0])) > MAX_LENGTH + 5
  got = setup["lm"].loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  want = [_reference(setup, c, x) for c, x in pairs]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert want[-1][1] and not all(w[1] for w in want)  # both outcomes of is-greedy are exercised


def test_loglikelihood_rolling_equals_eval_py_plain_text(setup):
  path = setup["tmp"] / "doc.txt"
  path.write_text(TEXT)
  result = evaluate.run(
      setup["workdir"],
      text_file=str(path),
      text_format="plain",
      max_length=MAX_LENGTH,
      batch_size=8,
      progress=False,
      write=False,
  )
  assert result["windows"] >= 3
  got = setup["lm"].loglikelihood_rolling(
      _requests("loglikelihood_rolling", [(TEXT,), ("a cat",), (TEXT,)]), disable_tqdm=True
  )
  np.testing.assert_allclose(-got[0], result["loss"] * result["tokens"], rtol=1e-5)
  assert got[2] == got[0] and got[1] < 0


@pytest.mark.slow
def test_eight_devices_equal_one(setup):
  from cla_jax import harness  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8
  one = harness.CLAHarnessLM(
      workdir=setup["workdir"], max_length=MAX_LENGTH, num_devices=1, batch_size=3, progress=False
  )
  assert (one.batch_size, setup["lm"].batch_size) == (3, 8)
  pairs = _pairs(setup)
  for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", [(TEXT,), (TEXT[:50],)])):
    got_one = getattr(one, kind)(_requests(kind, args), disable_tqdm=True)
    got_eight = getattr(setup["lm"], kind)(_requests(kind, args), disable_tqdm=True)
    values = lambda got: [g[0] if isinstance(g, tuple) else g for g in got]
    np.testing.assert_allclose(values(got_one), values(got_eight), rtol=1e-5)


def _mc_accuracy_by_hand(setup) -> float:
  """The multiple-choice accuracy: per question, the choice of highest log-prob of ' ' + choice."""
  right = [
      int(np.argmax([_reference(setup, d["question"], " " + c)[0] for c in d["choices"]])) == d["answer"]
      for d in MC_DOCS
  ]
  return float(np.mean(right))


def test_local_tasks_through_simple_evaluate(setup, tmp_path):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  tasks = TaskManager(include_path=setup["tasks"], include_defaults=False)
  results = lm_eval.simple_evaluate(model=setup["lm"], tasks=["cla_local_mc", "cla_local_text"], task_manager=tasks)[
      "results"
  ]
  accuracy = results["cla_local_mc"]["acc,none"]
  assert accuracy == pytest.approx(_mc_accuracy_by_hand(setup), abs=1e-12)
  path = tmp_path / "doc.txt"
  path.write_text(TEXT)
  by_eval_py = evaluate.run(
      setup["workdir"], text_file=str(path), text_format="plain", max_length=MAX_LENGTH, progress=False, write=False
  )
  for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
    np.testing.assert_allclose(results["cla_local_text"][f"{metric},none"], by_eval_py[metric], rtol=1e-5)


@pytest.mark.slow
def test_cli_gives_the_same_accuracy_and_one_line_errors(setup, tmp_path, monkeypatch, capsys):
  env = {**os.environ, **OFFLINE, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "out"
  cmd = [
      sys.executable,
      "-m",
      "cla_jax.cli.harness",
      "--model_args",
      f"workdir={setup['workdir']},max_length={MAX_LENGTH}",
      "--tasks",
      "cla_local_mc",
      "--include_path",
      setup["tasks"],
      "--output_path",
      str(out),
  ]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  saved = json.loads(open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]).read())
  # The same number simple_evaluate gives (the test above checks it against this hand computation).
  assert saved["results"]["cla_local_mc"]["acc,none"] == pytest.approx(_mc_accuracy_by_hand(setup), abs=1e-12)
  assert "cla_local_mc" in run.stdout  # the harness's own results table

  # A bad model_args value: one line, exit 2. In-process (a second subprocess would cost another jax start),
  # and without indexing the harness's thousands of built-in tasks (~10 s of CPU) this time.
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
  monkeypatch.setattr(sys, "argv", sys.argv[:])
  with pytest.raises(SystemExit) as exit_info:
    harness_command.main(
        [
            "--model_args",
            f"workdir={setup['workdir']},step=99",
            "--tasks",
            "cla_local_mc",
            "--include_path",
            setup["tasks"],
        ]
    )
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no checkpoint for step 99")


@pytest.mark.slow
def test_generate_until_equals_greedy_full_forward_loop(setup):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  tok, model = setup["tokenizer"], setup["model"]

  def greedy(prompt, steps=6):  # one full forward pass per new token, no cache
    ids = tok.encode(prompt)
    new = []
    for _ in range(steps):
      token = int(_log_probs(model, ids + new)[-1].argmax())
      if token == tok.eos_id:
        break
      new.append(token)
    return tok.decode(new).split(".")[0]

  want = [greedy(d["prompt"]) for d in GEN_DOCS]
  assert any(want)  # something is generated before a stop
  got = setup["lm"].generate_until(
      _requests("generate_until", [(d["prompt"], {"until": ["."], "max_gen_toks": 6}) for d in GEN_DOCS]),
      disable_tqdm=True,
  )
  assert got == want
  tasks = TaskManager(include_path=setup["tasks"], include_defaults=False)
  results = lm_eval.simple_evaluate(model=setup["lm"], tasks=["cla_local_gen"], task_manager=tasks, log_samples=True)
  assert [s["resps"][0][0] for s in sorted(results["samples"]["cla_local_gen"], key=lambda s: s["doc_id"])] == want
  exact = np.mean([w == d["answer"] for w, d in zip(want, GEN_DOCS)])
  assert results["results"]["cla_local_gen"]["exact_match,none"] == pytest.approx(exact)


def test_generation_without_generate_is_a_clear_error(setup, monkeypatch):
  monkeypatch.delattr(type(setup["lm"].model), "generate", raising=False)
  with pytest.raises(UserError, match="generate_until tasks need KV-cached generation"):
    setup["lm"].generate_until(_requests("generate_until", [("the cat", {"until": ["."]})]))


def test_bad_model_args_are_one_line_errors(setup):
  from lm_eval.api.registry import get_model, model_registry  # pylint: disable=g-import-not-at-top

  from cla_jax import harness  # pylint: disable=g-import-not-at-top

  assert get_model("cla_jax") is harness.CLAHarnessLM
  assert "hf" in model_registry  # registering ours did not hide the harness's own models
  make = lambda s: harness.CLAHarnessLM.create_from_arg_string(s, {"batch_size": 1, "device": None})
  with pytest.raises(UserError, match="unknown model_args pretrained"):
    make(f"workdir={setup['workdir']},pretrained=gpt2")
  with pytest.raises(UserError, match="max_length=0 must be at least 1"):
    make(f"workdir={setup['workdir']},max_length=0")
  with pytest.raises(UserError, match="batch_size='x' must be an integer"):
    make(f"workdir={setup['workdir']},batch_size=x")
  with pytest.raises(UserError, match="does not exist"):
    make(f"workdir={setup['tmp']}/nope")
  # model_args win over the harness's --batch_size (default 1).
  assert make(f"workdir={setup['workdir']},batch_size=16,max_length={MAX_LENGTH}").batch_size == 16
  assert harness_command.harness_argv(["--tasks", "x"]) == [
      "run",
      "--model",
      "cla_jax",
      "--batch_size",
      "auto",
      "--tasks",
      "x",
  ]
  assert harness_command.harness_argv(["ls", "tasks"]) == ["ls", "tasks"]
  with pytest.raises(UserError, match="--model hf"):
    harness_command.harness_argv(["--model", "hf", "--tasks", "x"])
