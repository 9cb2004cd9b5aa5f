"""The paper's model rows (Brandon et al. 2024), buildable by name from `configs/paper_*.py`.

Each row fixes only what the paper varies: head size, query/KV heads, the sharing pattern and
the learning rate. Everything else comes from the family (1B or 3B) and `configs/default.py`.
"""

from __future__ import annotations

import dataclasses

from cla_jax.model import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  """Shape and budget shared by all rows of one model scale (paper Section 3)."""

  d_model: int
  mlp_dim: int
  num_layers: int
  seq_len: int
  train_tokens: float


@dataclasses.dataclass(frozen=True)
class Row:
  """One trained model of the paper."""

  head_dim: int
  num_heads: int
  num_kv_heads: int
  pattern: str
  lr: float


FAMILIES = {
    "1b": Family(d_model=2048, mlp_dim=5472, num_layers=20, seq_len=2048, train_tokens=30e9),
    "3b": Family(d_model=3072, mlp_dim=8192, num_layers=32, seq_len=2048, train_tokens=100e9),
}
DESIGN_SPACE_LR = 3e-4
BATCH_SEQUENCES = 2048
# GPT-NeoX BPE has 50277 tokens; padded to a multiple of 128 for even sharding.
VOCAB_SIZE = 50304

_PATTERN_SUFFIX = {
    "": "none",
    "-CLA2": "cla2",
    "-CLA3": "cla3",
    "-CLA4": "cla4",
    "-CLA2-KeepEnds": "keep_ends",
    "-CLA2-DenseFront": "dense_front",
    "-CLA2-DenseBack": "dense_back",
}


def _row(name: str, num_heads: int, lr: float = DESIGN_SPACE_LR) -> tuple[str, Row]:
  """Parses 'H<d_head>-<MHA|GQA<k>|MQA><pattern suffix>' into a Row."""
  head, attn, *rest = name.split("-")
  suffix = "".join("-" + part for part in rest)
  kv_heads = {"MHA": num_heads, "MQA": 1}.get(attn) or int(attn.removeprefix("GQA"))
  return name, Row(int(head[1:]), num_heads, kv_heads, _PATTERN_SUFFIX[suffix], lr)


# Table 1: the 1B design space at LR 3e-4 (model name -> Row).
TABLE1 = dict(
    _row(n, h)
    for n, h in [
        ("H128-MHA", 16),
        ("H128-GQA4", 16),
        ("H128-GQA2", 16),
        ("H128-MQA", 16),
        ("H64-MQA", 32),
        ("H46-MQA", 45),
        ("H32-MQA", 64),
        ("H512-MQA-CLA2", 4),
        ("H256-MQA-CLA2", 8),
        ("H128-MQA-CLA2", 16),
        ("H90-MQA-CLA2", 22),
        ("H64-MQA-CLA2", 32),
        ("H256-GQA4-CLA2", 8),
        ("H128-GQA4-CLA2", 16),
        ("H128-GQA2-CLA2", 16),
        ("H128-MQA-CLA3", 16),
        ("H128-MQA-CLA4", 16),
        ("H128-MQA-CLA2-KeepEnds", 16),
        ("H128-MQA-CLA2-DenseFront", 16),
        ("H128-MQA-CLA2-DenseBack", 16),
    ]
)


def _tuned(name: str, num_heads: int, lr: float, tag: str) -> tuple[str, Row]:
  base, row = _row(name, num_heads, lr)
  return f"{base}-{tag}", row


# Tuned-LR rows. 1B rows carry '-tuned' so they do not collide with Table 1; the 3B table has
# two sets of runs, 'a' (validation + Wikitext) and 'b' (Wikitext only), named by suffix.
ROWS = {
    "1b": {
        **TABLE1,
        **dict(
            [
                _tuned("H128-MQA", 16, 1.5e-3, "tuned"),
                _tuned("H128-MQA-CLA2", 16, 2.25e-3, "tuned"),
                _tuned("H64-MQA", 32, 2.25e-3, "tuned"),
            ]
        ),
    },
    "3b": dict(
        [
            _row("H128-MQA", 24, 6.75e-4),
            _row("H128-MQA-CLA2", 24, 2.25e-3),
            _row("H64-MQA", 48, 1.0e-3),
            _tuned("H64-MQA", 48, 1e-3, "setb"),
            _tuned("H64-MQA-CLA2", 48, 1e-3, "setb"),
            _tuned("H32-MQA", 96, 1e-3, "setb"),
        ]
    ),
}


def apply_row(config, scale: str, name: str) -> None:
  """Overrides `config` in place with the family and row `name` of paper scale `scale`."""
  rows = ROWS[scale]
  if name not in rows:
    raise ConfigError(f"unknown {scale.upper()} paper row {name!r}; valid rows: {', '.join(rows)}.")
  family, row = FAMILIES[scale], rows[name]
  with config.unlocked():
    config.model.update(
        num_layers=family.num_layers,
        d_model=family.d_model,
        mlp_dim=family.mlp_dim,
        num_heads=row.num_heads,
        num_kv_heads=row.num_kv_heads,
        head_dim=row.head_dim,
        pattern=row.pattern,
        vocab_size=VOCAB_SIZE,
    )
    config.train.update(
        lr=row.lr,
        seq_len=family.seq_len,
        batch_size=BATCH_SEQUENCES,
        steps=round(family.train_tokens / (BATCH_SEQUENCES * family.seq_len)),
    )
    config.name = f"{scale}:{name}"
