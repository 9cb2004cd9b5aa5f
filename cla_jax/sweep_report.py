"""Sweep reports: results.csv/jsonl, the paper-style table (results.md), pareto.png and lr_sweep.png.

Every function reads the list of result rows the runner keeps (one dict per run, see `cla_jax.sweep`).
A row's quality is its mean validation perplexity over seeds at its best learning rate (the lowest mean).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import pathlib
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

# What a run's row is (shared by its seeds and learning rates).
ROW_FIELDS = ("d_head", "num_heads", "num_kv_heads", "num_layers", "kv_layers", "kv_bytes_per_token", "params")
FIELDS = (
    "name",
    "row",
    "family",
    "status",
    "error",
    "config",
    *ROW_FIELDS,
    "lr",
    "seed",
    "steps",
    "tokens",
    "val_loss",
    "perplexity",
    "eval_tokens",
    "wall_s",
)
FAMILY_COLORS = {"MQA": "tab:blue", "MQA+CLA2": "tab:orange", "GQA": "tab:green", "MHA": "tab:red"}


def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  """Points (cost, loss) that no other point matches or beats on both, sorted by cost (lower is better)."""
  frontier: list[tuple[float, float]] = []
  for x, y in sorted(points):  # by cost, then loss: the first point at each cost is its best
    if not frontier or y < frontier[-1][1]:
      frontier.append((x, y))
  return frontier


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_tables(results: Sequence[dict[str, Any]], directory: str | os.PathLike) -> None:
  """Rewrites results.jsonl and results.csv (one line per run, in sweep order)."""
  directory = pathlib.Path(directory)
  _write_atomic(directory / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
  tmp = directory / "results.csv.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
  os.replace(tmp, directory / "results.csv")


def lr_stats(results: Sequence[dict[str, Any]]) -> dict[str, dict[float, dict[str, float]]]:
  """row -> lr -> {mean, std, n, min, max} of the perplexity of finished runs (std 0 for one seed)."""
  values: dict[str, dict[float, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in results:
    if r.get("status") == "done" and math.isfinite(r["perplexity"]):
      values[r["row"]][float(r["lr"])].append(float(r["perplexity"]))
  return {
      row: {
          lr: {
              "mean": statistics.fmean(v),
              "std": statistics.stdev(v) if len(v) > 1 else 0.0,
              "n": len(v),
              "min": min(v),
              "max": max(v),
          }
          for lr, v in sorted(by_lr.items())
      }
      for row, by_lr in values.items()
  }


def best_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per row (in sweep order): its shape, best lr and perplexity stats there, and its other lrs' means."""
  stats = lr_stats(results)
  out, seen = [], set()
  for r in results:
    row = r["row"]
    if row in seen or row not in stats:
      continue
    seen.add(row)
    best_lr = min(stats[row], key=lambda lr: stats[row][lr]["mean"])
    out.append(
        {
            **{k: r[k] for k in ("row", "family", *ROW_FIELDS)},
            "best_lr": best_lr,
            **stats[row][best_lr],
            "other_lrs": {lr: s["mean"] for lr, s in stats[row].items() if lr != best_lr},
        }
    )
  return out


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
  """results.md: the paper's Table 1 columns, each row at its best lr (mean +- std over seeds)."""
  lines = [
      "| row | d_head | query heads | KV heads | layers | KV bytes/token | params | best lr | seeds | "
      "val perplexity |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for b in best_rows(results):
    ppl = f"{b['mean']:.2f} ± {b['std']:.2f}" if b["n"] > 1 else f"{b['mean']:.2f}"
    lines.append(
        f"| {b['row']} | {b['d_head']} | {b['num_heads']} | {b['num_kv_heads']} | {b['num_layers']} | "
        f"{b['kv_bytes_per_token']} | {b['params']:,} | {b['best_lr']:g} | {b['n']} | {ppl} |"
    )
  done = sum(r.get("status") == "done" for r in results)
  failed = [r for r in results if r.get("status") == "failed"]
  notes = [f"\n{done} of {len(results)} runs finished; ± is the standard deviation over seeds at the best lr."]
  notes += [f"- failed: {r['name']}: {r['error']}" for r in failed]
  return "\n".join(lines + notes) + "\n"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _color(family: str, families: list[str]) -> str:
  return FAMILY_COLORS.get(family) or f"C{(families.index(family) + 4) % 10}"


def _save(plt, fig, path: str | os.PathLike) -> None:
  fig.tight_layout()
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
  os.replace(tmp, path)  # a reader never sees half a PNG


def plot_pareto(results: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
  """Perplexity vs KV bytes/token (log x): best-lr means with seed error bars, other lrs faint, frontiers."""
  plt = _pyplot()
  best = best_rows(results)
  families = sorted({b["family"] for b in best})
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for family in families:
    rows = [b for b in best if b["family"] == family]
    color = _color(family, families)
    for b in rows:
      ax.scatter(
          [b["kv_bytes_per_token"]] * len(b["other_lrs"]),
          list(b["other_lrs"].values()),
          color=color,
          alpha=0.2,
          s=18,
          linewidths=0,
      )
    ax.errorbar(
        [b["kv_bytes_per_token"] for b in rows],
        [b["mean"] for b in rows],
        yerr=[b["std"] for b in rows],
        fmt="o",
        color=color,
        capsize=3,
        label=family,
    )
    for b in rows:
      ax.annotate(
          f"{b['row']} (lr {b['best_lr']:g})",
          (b["kv_bytes_per_token"], b["mean"]),
          fontsize=7,
          xytext=(4, 4),
          textcoords="offset points",
          color=color,
      )
    frontier = pareto_frontier((b["kv_bytes_per_token"], b["mean"]) for b in rows)
    ax.plot(*zip(*frontier), color=color, alpha=0.7, linewidth=1.5)
  ax.set_xscale("log")
  ax.margins(x=0.15)  # room for the labels
  ax.set_xlabel("KV-cache bytes per token (16-bit, log scale)")
  ax.set_ylabel("validation perplexity (best lr; bars: ±1 std over seeds)")
  ax.set_title(f"{title + ': ' if title else ''}perplexity vs KV cache (faint: other learning rates)")
  ax.grid(True, which="both", alpha=0.3)
  if families:
    ax.legend()
  _save(plt, fig, path)


def plot_lr(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """Perplexity vs learning rate (log x), one line per row with seed error bars."""
  plt = _pyplot()
  stats = lr_stats(results)
  best = best_rows(results)
  families = sorted({b["family"] for b in best})
  fig, ax = plt.subplots(figsize=(8, 5.5))
  markers = "osD^v<>ph*"
  for i, b in enumerate(best):
    lrs = list(stats[b["row"]])
    ax.errorbar(
        lrs,
        [stats[b["row"]][lr]["mean"] for lr in lrs],
        yerr=[stats[b["row"]][lr]["std"] for lr in lrs],
        marker=markers[i % len(markers)],
        color=_color(b["family"], families),
        capsize=2,
        label=b["row"],
        alpha=0.85,
    )
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate (log scale)")
  ax.set_ylabel("validation perplexity (mean ± std over seeds)")
  ax.set_title("Learning-rate sweep per row")
  ax.grid(True, which="both", alpha=0.3)
  if best:
    ax.legend(fontsize=7, ncol=2)
  _save(plt, fig, path)


def write_all(results: Sequence[dict[str, Any]], directory: str | os.PathLike, title: str = "") -> None:
  """All reports of a sweep directory (the plots only once some run finished)."""
  directory = pathlib.Path(directory)
  write_tables(results, directory)
  _write_atomic(directory / "results.md", markdown_table(results))
  if any(r.get("status") == "done" for r in results):
    plot_pareto(results, directory / "pareto.png", title)
    plot_lr(results, directory / "lr_sweep.png")
