"""Cross-layer KV sharing patterns: which layers share one K/V projection.

A pattern is a tuple of group sizes summing to the number of layers. Group `g`
covers consecutive layers; its first layer's input feeds the group's single KV
block, and every layer of the group attends to that K/V. Consecutive groups of
equal size form a *segment*, the unit the model scans over.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cla_jax.errors import UserError

NAMED_PATTERNS = ("none", "cla<N>", "keep_ends", "dense_front", "dense_back", "<comma-separated sizes>")


class PatternError(UserError):
  """A sharing pattern that cannot be built for the requested depth."""


def _uniform(num_layers: int, share_factor: int) -> list[int]:
  # The paper's CLA3 figure puts the leftover (smaller) group first.
  leftover = num_layers % share_factor
  return ([leftover] if leftover else []) + [share_factor] * (num_layers // share_factor)


def group_sizes(pattern: str, num_layers: int) -> tuple[int, ...]:
  """Group sizes (first layer to last) that `pattern` gives at depth `num_layers`."""
  if num_layers <= 0:
    raise PatternError(f"model.num_layers must be positive, got {num_layers}.")
  name = pattern.strip().lower()
  half = num_layers // 2
  if name in ("none", "cla1"):
    sizes = [1] * num_layers
  elif m := re.fullmatch(r"cla(\d+)", name):
    share_factor = int(m.group(1))
    if share_factor <= 0:
      raise PatternError(f"model.pattern={pattern!r}: the share factor must be positive, e.g. 'cla2'.")
    sizes = _uniform(num_layers, share_factor)
  elif name == "keep_ends":
    if num_layers < 2:
      raise PatternError(f"model.pattern='keep_ends' needs num_layers >= 2, got {num_layers}; use 'none'.")
    sizes = [1] + _uniform(num_layers - 2, 2) + [1]
  elif name == "dense_front":
    # Paper, 20 layers: {0}..{8} alone, {9..18} share, {19} alone.
    sizes = [1] * (num_layers - half - 1) + [half, 1]
  elif name == "dense_back":
    # Paper, 20 layers: {0} alone, {1..10} share, {11}..{19} alone.
    sizes = [1, half] + [1] * (num_layers - half - 1)
  elif re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", name):
    sizes = [int(s) for s in name.split(",") if s.strip()]
    if any(s <= 0 for s in sizes):
      raise PatternError(f"model.pattern={pattern!r}: every group size must be positive, e.g. '1,2,2,1'.")
    if sum(sizes) != num_layers:
      raise PatternError(
          f"model.pattern={pattern!r} covers {sum(sizes)} layers but model.num_layers={num_layers}; "
          f"make the sizes sum to {num_layers}, e.g. '{','.join(map(str, _uniform(num_layers, 2)))}'."
      )
  else:
    raise PatternError(f"unknown model.pattern={pattern!r}; valid: {', '.join(NAMED_PATTERNS)}.")
  sizes = [s for s in sizes if s > 0]
  if len(sizes) == 0 or sum(sizes) != num_layers:
    raise PatternError(f"model.pattern={pattern!r} cannot cover num_layers={num_layers}; try 'cla2' or 'none'.")
  return tuple(sizes)


def segments(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Run-length encodes group sizes into (group_size, num_groups) segments."""
  runs: list[list[int]] = []
  for size in sizes:
    if runs and runs[-1][0] == size:
      runs[-1][1] += 1
    else:
      runs.append([size, 1])
  return tuple((size, count) for size, count in runs)


def layer_groups(sizes: Sequence[int]) -> list[list[int]]:
  """Layer indices of each group, e.g. (1, 2) -> [[0], [1, 2]]."""
  groups, start = [], 0
  for size in sizes:
    groups.append(list(range(start, start + size)))
    start += size
  return groups
