"""Bad input on every surface is one UserError line naming the problem and its fix (issue 27's inputs).

In-process, so each case costs milliseconds; test_reliability's command-line table checks that `cli.start`
prints such an error as one `error:` line with exit status 2.
"""

import os
import pathlib
import textwrap

import pytest

from cla_jax import config_lib, paths, sweep, trainer
from cla_jax.data import sources, splits
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError
from cla_jax.model import ModelConfig
from tests import train_helpers as th


def _one_line(error: pytest.ExceptionInfo, *words: str) -> str:
  message = str(error.value)
  assert "\n" not in message and "\\n" not in message and "\\'" not in message, message
  for word in words:
    assert word in message, (word, message)
  return message


# ----------------------------------------------------------------------------- files of a text corpus

BAD_FILES = {
    "random bytes": bytes(range(256)) * 4,
    "a NUL byte": b"plain text\0more text\n",
    "latin-1": "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"),
}


def _corpus_with(directory: pathlib.Path, content: bytes, split: str) -> pathlib.Path:
  """Four good .txt files and one bad one whose name puts it in `split` (eval_fraction 0.2)."""
  directory.mkdir()
  for i in range(4):
    (directory / f"good{i}.txt").write_text(f"the cat sat on mat number {i}.\n" * 50)
  for i in range(200):  # pick a name that splits.held_out places in the wanted split
    names = [f"good{j}.txt" for j in range(4)] + [f"bad{i}.txt"]
    if (f"bad{i}.txt" in splits.held_out(names, 0.2)) == (split == "validation"):
      bad = directory / f"bad{i}.txt"
      bad.write_bytes(content)
      return bad
  raise AssertionError("no name lands in the split")


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_bad_file_is_refused_whichever_split_it_lands_in(tmp_path, kind, split):
  bad = _corpus_with(tmp_path / "text", BAD_FILES[kind], split)
  source = sources.TextSource(str(tmp_path / "text" / "*.txt"), "text", 0.2)
  with pytest.raises(UserError) as err:
    list(source.documents("train"))  # training reads only the train split
  _one_line(err, str(bad), "is not UTF-8 text")


def test_a_bad_file_is_named_when_training_the_tokenizer(tmp_path, tiny_config):
  bad = _corpus_with(tmp_path / "text", BAD_FILES["random bytes"], "train")
  tiny_config.data.update(
      source="text", text_glob=str(tmp_path / "text" / "*.txt"), cache_dir=str(tmp_path / "cache"), eval_fraction=0.2
  )
  with pytest.raises(UserError) as err:
    tokenizer_lib.get_tokenizer(tiny_config)
  _one_line(err, str(bad), "is not UTF-8 text")


def test_an_error_inside_sentencepiece_training_keeps_its_own_message():
  def texts():
    yield "the cat sat on the mat. " * 200
    raise UserError("/data/bad.txt is not UTF-8 text (byte 3); convert it.")

  with pytest.raises(UserError) as err:
    tokenizer_lib.train_sentencepiece(texts(), vocab_size=300)
  assert str(err.value) == "/data/bad.txt is not UTF-8 text (byte 3); convert it."


# ----------------------------------------------------------------------------- newer commands


def test_generate_prompt_file_that_is_not_text(tmp_path):
  from cla_jax.cli import generate as generate_cli  # pylint: disable=g-import-not-at-top

  prompts = tmp_path / "prompts.txt"
  prompts.write_bytes(bytes(range(128, 256)))
  with pytest.raises(UserError) as err:
    generate_cli.read_prompts(None, str(prompts))
  _one_line(err, str(prompts), "is not UTF-8 text")
  prompts.write_text("first\n\nsecond\n")
  assert generate_cli.read_prompts("zero", str(prompts)) == ["zero", "first", "second"]


def test_output_directories_that_cannot_be_written(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(UserError) as err:
    paths.check_output_dir(a_file, "--workdir")
  _one_line(err, "--workdir=", "is a file, not a directory")
  with pytest.raises(UserError) as err:
    paths.check_output_dir(a_file / "sub", "--out")
  _one_line(err, "cannot create --out=", "is a file")
  paths.check_output_dir(tmp_path / "new" / "dir", "--out")  # creatable: fine, and nothing is created
  assert not (tmp_path / "new").exists()


def test_export_to_a_read_only_directory(tmp_path):
  from cla_jax import export_hf  # pylint: disable=g-import-not-at-top
  from tests.test_reliability import _mount, _umount  # pylint: disable=g-import-not-at-top

  read_only = tmp_path / "ro"
  _mount("-t tmpfs", read_only, "-o", "size=1M,ro", "tmpfs")  # skips unless root
  try:
    with pytest.raises(UserError) as err:
      export_hf.export(tmp_path / "no_workdir_needed", read_only / "hf")  # refused before the restore
    _one_line(err, f"--out={read_only / 'hf'}", "not writable")
  finally:
    _umount(read_only)


def test_prepare_output_that_is_a_file(tmp_path, corpus):
  from cla_jax.data import prepare  # pylint: disable=g-import-not-at-top

  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(UserError) as err:
    prepare.prepare(th.use_corpus(th.tiny_config(), corpus), output=str(a_file))
  _one_line(err, "--output=", "is a file, not a directory")


SWEEPS = {
    "syntax error": ("def get_runs(:\n  return []\n", "line 1: invalid syntax"),
    "import error": ("import no_such_module_xyz\n", "failed to load: ModuleNotFoundError"),
    "get_runs raises": ("def get_runs():\n  raise RuntimeError('boom')\n", "get_runs() of sweep file"),
    "get_runs returns 42": ("def get_runs():\n  return 42\n", "returned int 42; it must return a list"),
    "a run that is not a Run": ("def get_runs():\n  return [42]\n", "returned int 42 among its runs"),
    "no get_runs": ("RUNS = []\n", "has no get_runs() function"),
}


@pytest.mark.parametrize("case", sorted(SWEEPS))
def test_sweep_files_that_cannot_give_runs(tmp_path, case):
  text, words = SWEEPS[case]
  path = tmp_path / "my_sweep.py"
  path.write_text(text)
  with pytest.raises(UserError) as err:
    sweep.load_sweep(str(path), None)
  _one_line(err, str(path), words)


def test_a_good_sweep_file_still_loads(tmp_path):
  path = tmp_path / "ok.py"
  path.write_text(textwrap.dedent("""\
      from cla_jax.sweep import Run
      def get_runs():
        return (Run(row="A", config="configs/default.py", overrides={"train.lr": 1e-3}) for _ in range(1))
      """))
  (run,) = sweep.load_sweep(str(path), None)
  assert run.row == "A" and run.name


def test_harness_without_workdir_or_with_an_unknown_task(monkeypatch, capsys):
  import functools  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  from cla_jax import harness  # pylint: disable=g-import-not-at-top
  from cla_jax.cli import harness as harness_command  # pylint: disable=g-import-not-at-top

  with pytest.raises(UserError) as err:
    harness.CLAHarnessLM.create_from_arg_string("step=6", {"batch_size": 1})
  _one_line(err, "model_args has no workdir", "workdir=")
  # Without indexing the harness's thousands of built-in tasks: the unknown name is unknown either way.
  monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
  monkeypatch.setattr(sys, "argv", sys.argv[:])
  with pytest.raises(SystemExit) as exit_info:
    harness_command.main(["--model_args", "workdir=/nonexistent", "--tasks", "no_such_task"])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1] == (
      "error: unknown task(s): no_such_task; list the tasks with `python -m cla_jax.cli.harness ls tasks`."
  )


# ----------------------------------------------------------------------------- config fields


@pytest.mark.parametrize("field, value", [("rope_theta", 0.0), ("init_std", -1.0), ("norm_eps", 0.0)])
def test_each_bad_positive_model_field_is_named_alone(tiny_config, field, value):
  tiny_config.model[field] = value
  with pytest.raises(UserError) as err:
    ModelConfig.from_config(tiny_config.model)
  message = _one_line(err, f"model.{field} must be a finite number > 0, got {value!r}")
  assert [f for f in ("init_std", "norm_eps", "rope_theta") if f in message] == [field]


def test_a_mistyped_config_field_reads_cleanly():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from cla_jax import cli  # pylint: disable=g-import-not-at-top

  argv = ["train.py", "--config.model.num_layerz=3"]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cli.sys, "argv", argv)  # config_flags applies the overrides in sys.argv as it defines the flag
    with pytest.raises((AttributeError, KeyError)) as err:
      config_flags.DEFINE_config_dict("config", th.tiny_config(), flag_values=flags.FlagValues())
    message = cli.unknown_field_message(err.value)
  assert message == (
      '--config.model.num_layerz: no such config field (did you mean "num_layers"?); see configs/default.py for '
      "the fields."
  )


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("train.seq_len", 4_000_000, "fewer than train.seq_len + 1 = 4000001"),
        ("model.init_std", -1.0, "model.init_std must be"),
        ("train.clip_norm", -1.0, "train.clip_norm must be"),
        ("model.num_heads", 3, "model.num_heads=3 is not divisible"),
    ],
)
def test_a_config_that_cannot_train_writes_nothing(tmp_path, corpus, field, value, words):
  config = th.use_corpus(th.tiny_config(), corpus)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(UserError) as err:
    trainer.Trainer(config, str(tmp_path / "run"))
  _one_line(err, words)
  assert not os.path.exists(tmp_path / "run")


def test_config_values_are_checked_before_the_data(tmp_path, corpus):
  config = th.use_corpus(th.tiny_config(), corpus)
  config.data.text_glob = str(tmp_path / "none" / "*.txt")  # would fail too, but later
  config.train.lr = 0.0
  with pytest.raises(config_lib.ConfigError, match="train.lr must be"):
    trainer.Trainer(config, str(tmp_path / "run"))
