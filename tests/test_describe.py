"""`describe` and the shipped configs against the paper's own figures.

Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention" (arXiv 2405.12981):
Table 1 (1B design space) and the tuned-learning-rate table (1B and 3B).
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from cla_jax import config_lib, paper
from cla_jax.describe import describe

# (row, KV layers, KV bytes/token) as printed in the paper's Table 1.
TABLE1 = [
    ("H128-MHA", 20, 163840),
    ("H128-GQA4", 20, 40960),
    ("H128-GQA2", 20, 20480),
    ("H128-MQA", 20, 10240),
    ("H64-MQA", 20, 5120),
    ("H46-MQA", 20, 3680),
    ("H32-MQA", 20, 2560),
    ("H512-MQA-CLA2", 10, 20480),
    ("H256-MQA-CLA2", 10, 10240),
    ("H128-MQA-CLA2", 10, 5120),
    ("H90-MQA-CLA2", 10, 3600),
    ("H64-MQA-CLA2", 10, 2560),
    ("H256-GQA4-CLA2", 10, 40960),
    ("H128-GQA4-CLA2", 10, 20480),
    ("H128-GQA2-CLA2", 10, 10240),
    ("H128-MQA-CLA3", 7, 3584),
    ("H128-MQA-CLA4", 5, 2560),
    ("H128-MQA-CLA2-KeepEnds", 11, 5632),
    ("H128-MQA-CLA2-DenseFront", 11, 5632),
    ("H128-MQA-CLA2-DenseBack", 11, 5632),
]
# (config file, row, KV bytes/token, best LR) from the tuned-LR table.
TUNED = [
    ("paper_1b.py", "H128-MQA-tuned", 10240, 1.5e-3),
    ("paper_1b.py", "H128-MQA-CLA2-tuned", 5120, 2.25e-3),
    ("paper_1b.py", "H64-MQA-tuned", 5120, 2.25e-3),
    ("paper_3b.py", "H128-MQA", 16384, 6.75e-4),
    ("paper_3b.py", "H128-MQA-CLA2", 8192, 2.25e-3),
    ("paper_3b.py", "H64-MQA", 8192, 1.0e-3),
    ("paper_3b.py", "H64-MQA-setb", 8192, 1e-3),
    ("paper_3b.py", "H64-MQA-CLA2-setb", 4096, 1e-3),
    ("paper_3b.py", "H32-MQA-setb", 4096, 1e-3),
]


def test_table1_is_complete():
  assert sorted(paper.TABLE1) == sorted(row for row, _, _ in TABLE1)


@pytest.mark.parametrize("row,kv_layers,kv_bytes", TABLE1)
def test_table1_kv_cache_bytes(row, kv_layers, kv_bytes):
  config = config_lib.load(f"configs/paper_1b.py:{row}")
  info = describe(config_lib.model_config(config))
  assert (info["kv_layers"], info["kv_bytes_per_token"]) == (kv_layers, kv_bytes)
  assert config.train.lr == 3e-4 and config.train.seq_len == 2048 and config.train.batch_size == 2048
  assert sum(len(g) for g in info["groups"]) == 20


@pytest.mark.parametrize("file,row,kv_bytes,lr", TUNED)
def test_tuned_rows(file, row, kv_bytes, lr):
  config = config_lib.load(f"configs/{file}:{row}")
  info = describe(config_lib.model_config(config))
  assert info["kv_bytes_per_token"] == kv_bytes
  assert config.train.lr == lr


def test_param_count_matches_a_hand_count():
  config = config_lib.load("configs/paper_1b.py:H128-MQA-CLA2")
  d, f, v, layers, kv_blocks = 2048, 5472, config.model.vocab_size, 20, 10
  per_layer = d * 16 * 128 * 2 + 3 * d * f + 2 * d  # Q, O, SwiGLU, two norms
  per_kv_block = 2 * d * 1 * 128 + d  # K, V, KV norm
  expected = 2 * v * d + layers * per_layer + kv_blocks * per_kv_block + d
  assert describe(config_lib.model_config(config))["params"] == expected
  assert 1.0e9 < expected < 1.2e9  # a "1B" model


def test_unscanned_layout_describes_the_same_model():
  config = config_lib.load("configs/paper_1b.py:H128-MQA-CLA2-KeepEnds")
  scanned = describe(config_lib.model_config(config))
  config.model.scan_layers = False
  assert describe(config_lib.model_config(config)) == scanned
  assert scanned["groups"][:2] == [[0], [1, 2]] and scanned["groups"][-1] == [19]


def _shipped_configs() -> list[str]:
  """Every `configs/<file>[:row]` a user can name: each shipped file, each paper file once per row."""
  specs = []
  for path in sorted(glob.glob(os.path.join(config_lib.CONFIGS_DIR, "*.py"))):
    name = os.path.basename(path)
    if name == "__init__.py":
      continue
    rows = {"paper_1b.py": paper.ROWS["1b"], "paper_3b.py": paper.ROWS["3b"]}.get(name, [None])
    specs += [f"configs/{name}" + (f":{row}" if row else "") for row in rows]
  return specs


@pytest.mark.parametrize("spec", _shipped_configs())
def test_every_shipped_config_and_row_builds(spec):
  """Builds the model and checks its parameter count against a count from the config's own fields."""
  config = config_lib.load(spec)
  m, info = config.model, describe(config_lib.model_config(config))
  assert [layer for group in info["groups"] for layer in group] == list(range(m.num_layers))
  norm = 2 if m.norm == "layernorm" else 1  # scale (and bias)
  per_layer = 2 * m.d_model * m.num_heads * m.head_dim + 3 * m.d_model * m.mlp_dim + 2 * norm * m.d_model
  per_kv_block = 2 * m.d_model * m.num_kv_heads * m.head_dim + norm * m.d_model
  embeddings = (1 if m.tie_embeddings else 2) * m.vocab_size * m.d_model
  expected = embeddings + m.num_layers * per_layer + len(info["groups"]) * per_kv_block + norm * m.d_model
  assert info["params"] == expected


def _cli(*args, cwd=config_lib.REPO_ROOT):
  return subprocess.run(
      [sys.executable, "-m", "cla_jax.cli.describe", *args], capture_output=True, text=True, cwd=cwd, timeout=120
  )


@pytest.mark.slow
def test_cli_prints_one_json_line_from_any_directory(tmp_path):
  """`configs/...` names the shipped config even where the working directory has no configs/."""
  out = _cli("--config=configs/paper_3b.py:H128-MQA-CLA2", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  info = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(info) == {"groups", "kv_layers", "kv_bytes_per_token", "params"}
  assert info["kv_layers"] == 16 and info["kv_bytes_per_token"] == 8192


@pytest.mark.slow
def test_cli_default_config_works_from_any_directory(tmp_path):
  out = _cli(cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["groups"] == [[0, 1], [2, 3]]  # default: 4 layers, CLA2


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/paper_1b.py:H128-MQA-CLA9"], "unknown 1B paper row 'H128-MQA-CLA9'; valid rows: H128-MHA"),
        (["--config=configs/default.py", "--config.model.num_kv_heads=3"], "not divisible by model.num_kv_heads=3"),
        (["--config=configs/default.py", "--config.model.pattern=2,1"], "covers 3 layers"),
        (
            ["--config=configs/default.py", "--config.model.num_layer=3"],
            'num_layer: no such config field (did you mean "num_layers"?)',
        ),
        (["--config=configs/nope.py"], "config file 'configs/nope.py' not found"),
    ],
)
def test_cli_errors_are_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip() and "libtpu" not in line]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
