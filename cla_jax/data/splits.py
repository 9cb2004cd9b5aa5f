"""Split names and held-out sets: the two rules every source shares (no dependencies, so anyone may import it)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import ml_collections


def resolve_split(config: ml_collections.ConfigDict, split: str | None) -> str:
  """'train' and 'validation' (the default) name data.train_split and data.eval_split; others are literal."""
  split = split or "validation"
  if split == "train":
    return str(config.data.train_split)
  if split == "validation":
    return str(config.data.eval_split)
  return str(split)


def held_out(ids: Iterable[str], fraction: float) -> set[str]:
  """The fixed held-out ids: the ceil(fraction * n) with the smallest sha256 of their name (none when 0).

  At least one id stays on the training side, and a positive fraction holds out at least one.
  """
  ids = list(ids)
  if fraction <= 0 or len(ids) < 2:
    return set()
  ranked = sorted(ids, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
  return set(ranked[: min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))])
