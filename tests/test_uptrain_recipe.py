"""scripts/uptrain_recipe.py: bad settings are one error line; the table reads its results right."""

import importlib.util
import subprocess
import sys

import pytest

from tests import train_helpers as th

_SPEC = importlib.util.spec_from_file_location("uptrain_recipe", th.REPO_ROOT / "scripts" / "uptrain_recipe.py")
recipe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(recipe)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--recovery_steps=50,x", "--recovery_steps='50,x' must be comma-separated integers"),
        ("--recovery_steps=0,10", "must be positive"),
        ("--inits=first,median", "each must be one of"),
        ("--teacher_steps=-3", "must be positive"),
        ("--distill_weight=-0.5", "--distill_weight must be in [0, 1]"),
        ("--distill_temperature=0", "--distill_temperature > 0"),
        ("--eval_tokens=0", "must be positive"),
    ],
)
def test_bad_settings_are_one_error_line(tmp_path, flag, message):
  result = subprocess.run(
      [sys.executable, "scripts/uptrain_recipe.py", f"--out={tmp_path / 'out'}", flag],
      cwd=th.REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=60,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not (tmp_path / "out").exists()


def test_table_has_one_row_per_model_and_the_numbers_in_their_columns():
  args = recipe.parse_args(["--out=x", "--recovery_steps=5,10", "--inits=first,lsq", "--teacher_steps=7"])
  assert args.recovery == [5, 10] and args.inits == ["first", "lsq"]
  results = {
      "teacher": 10.0,
      "scratch": {"5": 30.0, "10": 20.0},
      "uptrained": {
          name: {"converted": 99.0 + i, "lm": {"5": 50.0, "10": 40.0}, "distill": {"5": 45.0, "10": 35.5}}
          for i, name in enumerate(("first", "lsq"))
      },
  }
  text = recipe.table(results, args)
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0] == "| model | after conversion | +5 steps | +10 steps |"
  assert rows[2] == "| CLA2 from scratch (7 + n steps) | – | 30.00 | 20.00 |"
  assert rows[3] == "| teacher -> CLA2, kv_init=first, LM loss | 99.00 | 50.00 | 40.00 |"
  assert rows[6] == "| teacher -> CLA2, kv_init=lsq, distillation | 100.00 | 45.00 | 35.50 |"
  assert len(rows) == 7 and "**10.00**" in text
