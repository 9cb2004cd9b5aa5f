"""Distillation from a frozen teacher: the KL term against numpy, the teacher never trained nor saved,
exact resume after kill -9 with a teacher attached, and bad teachers / settings as one-line errors."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import checkpoint, config_lib, distill, trainer
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.errors import UserError
from tests import train_helpers as th


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus):
  """A 10-step pattern=none run: the teacher of the cla2 students below."""
  config = th.config_on(corpus, steps=10)
  config.model.pattern = "none"
  workdir = tmp_path_factory.mktemp("teacher") / "run"
  trainer.run(config, str(workdir))
  return workdir


def _numpy_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
  """Per-token KL(softmax(teacher/T) || softmax(student/T)) in float64."""

  def log_softmax(x):
    x = x.astype(np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(teacher), log_softmax(student)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _batch(rng, vocab, b=2, t=12):
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  weights = np.ones((b, t), np.float32)
  weights[1, -3:] = 0  # padded tail: must not count
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "weights": jnp.asarray(weights)}


@pytest.mark.slow
def test_objective_matches_numpy_and_is_zero_with_zero_gradient_for_an_identical_teacher(tiny_config):
  cfg = config_lib.model_config(tiny_config)
  model = model_lib.Transformer(cfg)
  student, other = (model_lib.init_params(cfg, jax.random.key(s)) for s in (0, 1))
  batch = _batch(np.random.default_rng(0), cfg.vocab_size)
  weights = np.asarray(batch["weights"], np.float64)

  def teacher_of(params, weight, temperature):
    return distill.Teacher(model, params, None, weight, temperature, "test")

  # A different teacher: the KL and the mixed loss equal numpy's on the same logits.
  weight, temperature = 0.3, 2.0
  total, (tokens, terms) = distill.objective(
      student, batch, model=model, teacher=teacher_of(other, weight, temperature), teacher_params=other
  )
  s_logits = np.asarray(model.apply({"params": student}, batch["inputs"]), np.float64)
  t_logits = np.asarray(model.apply({"params": other}, batch["inputs"]), np.float64)
  kl = (_numpy_kl(s_logits, t_logits, temperature) * weights).sum()
  log_probs = s_logits - s_logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets = np.asarray(batch["targets"])
  ce = (-np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights).sum()
  assert float(tokens) == weights.sum()
  assert float(terms["distill_kl"]) == pytest.approx(kl, rel=1e-4) and kl > 1e-3
  assert float(terms["distill_lm_loss"]) == pytest.approx(ce, rel=1e-5)
  assert float(total) == pytest.approx((1 - weight) * ce + weight * temperature**2 * kl, rel=1e-5)

  # The teacher is the student: KL 0, and with the KL alone (weight 1) every gradient is 0.
  same = teacher_of(student, 1.0, temperature)
  grads, (_, terms) = jax.grad(
      lambda p: distill.objective(p, batch, model=model, teacher=same, teacher_params=student), has_aux=True
  )(student)
  assert abs(float(terms["distill_kl"])) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-7
  # ... and the teacher's params get no gradient at all (stop_gradient), whatever the student.
  teacher_grads = jax.grad(
      lambda tp: distill.objective(student, batch, model=model, teacher=same, teacher_params=tp)[0]
  )(other)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(teacher_grads))


@pytest.mark.slow
def test_teacher_is_never_updated_nor_saved(tmp_path, corpus, teacher_dir):
  teacher_before, _, _ = workdir_lib.restore_params(teacher_dir)
  config = th.config_on(corpus, steps=6, teacher=str(teacher_dir), distill_weight=0.5, distill_temperature=2.0)
  config.checkpoint.update(every_steps=3)
  workdir = tmp_path / "student"
  trainer.run(config, str(workdir))

  teacher_after, _, _ = workdir_lib.restore_params(teacher_dir)
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert workdir_lib.latest_step(teacher_dir) == 10
  # The student's checkpoints hold exactly the student's params (cla2: 2 groups), optimizer state and meta.
  for step in (3, 6):
    items = sorted(p.name for p in (workdir / "checkpoints" / str(step)).iterdir() if p.is_dir())
    assert items == ["meta", "opt_state", "params"]
  params, _, _ = workdir_lib.restore_params(workdir)
  expected = jax.eval_shape(lambda: model_lib.init_params(config_lib.model_config(config), jax.random.key(0)))
  assert checkpoint.shape_differences(params, expected) == []
  records = th.losses(workdir)
  assert sorted(records) == list(range(1, 7))
  from cla_jax import metrics  # pylint: disable=g-import-not-at-top

  last = list(metrics.read_jsonl(workdir / "metrics.jsonl"))[-1]
  assert last["distill_kl"] > 0 and last["distill_lm_loss"] > 0
  # The logged loss is the mixed objective: (1 - w) * LM + w * T^2 * KL.
  assert last["loss"] == pytest.approx(0.5 * last["distill_lm_loss"] + 0.5 * 4.0 * last["distill_kl"], rel=1e-5)


@pytest.mark.slow
def test_killed_run_with_a_teacher_resumes_with_identical_losses(tmp_path, corpus, teacher_dir):
  config = th.config_on(corpus, steps=24, teacher=str(teacher_dir))
  config.checkpoint.update(every_steps=4)
  reference = tmp_path / "reference"
  trainer.run(config, str(reference))
  expected = th.losses(reference)

  workdir = tmp_path / "run"
  killed_at = th.kill_after_checkpoint(config, workdir, 8)
  assert 8 <= killed_at < 24
  result = th.run(config, workdir)
  assert result.returncode == 0, result.stderr
  assert f"resumed from checkpoint step {killed_at}" in result.stdout
  got = th.losses(workdir)
  np.testing.assert_array_equal([got[s] for s in range(1, 25)], [expected[s] for s in range(1, 25)])


def _word_tokenizer(path):
  import tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the a cat dog sees likes".split())}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["</s>"])
  tok.save(str(path))
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        ({"train.teacher": "MISSING"}, r"train.teacher=.*does not exist"),
        ({"train.teacher": "NOT_A_MODEL"}, r"neither a cla_jax workdir .* nor a Hugging Face"),
        ({"train.distill_weight": -0.1}, r"train.distill_weight must be in \[0, 1\]"),
        ({"train.distill_weight": 1.5}, r"train.distill_weight must be in \[0, 1\]"),
        ({"train.distill_temperature": -1.0}, r"train.distill_temperature must be a number > 0"),
        ({"train.distill_temperature": 0.0}, r"train.distill_temperature must be a number > 0"),
        ({"model.vocab_size": 384}, r"has vocab_size 256 but the student has 384"),
        ({"data.tokenizer": "WORDS"}, r"uses another tokenizer"),
    ],
)
def test_bad_teachers_and_settings_are_one_line_errors(tmp_path, corpus, teacher_dir, change, message):
  config = th.config_on(corpus, steps=2, teacher=str(teacher_dir))
  ((field, value),) = change.items()
  if value == "MISSING":
    value = str(tmp_path / "nowhere")
  elif value == "NOT_A_MODEL":
    (tmp_path / "empty").mkdir()
    value = str(tmp_path / "empty")
  elif value == "WORDS":
    value = _word_tokenizer(tmp_path / "tokenizer.json")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(UserError, match=message) as err:
    trainer.run(config, str(tmp_path / "student"))
  assert "\n" not in str(err.value)
  assert not (tmp_path / "student").exists()  # refused before the workdir was touched


@pytest.mark.slow
def test_missing_teacher_from_the_command_line_is_one_error_line(tmp_path, corpus):
  config = th.config_on(corpus, steps=2, teacher=str(tmp_path / "nowhere"))
  result = subprocess.run(
      th.train_cmd(config, tmp_path / "w"), cwd=th.REPO_ROOT, env=th.env(), capture_output=True, text=True, timeout=240
  )
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: train.teacher=") and "does not exist" in lines[0]
