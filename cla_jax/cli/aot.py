"""`cla-aot`: will it fit? Compiles the real train and eval steps for a TPU slice on this machine (cla_jax.aot).

    cla-aot --config=configs/paper_1b.py:H128-MQA-CLA2 --topology=v5e-256 [--num_slices=N] [--max_batch]

Prints a table, then one JSON line.
"""

import json
import sys
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from cla_jax import aot, cli, config_lib, topology


def _json_safe(x: Any) -> Any:
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return x


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  config_flags.DEFINE_config_file(
      "config", config_lib.DEFAULT_CONFIG, "Experiment config (path[:row]).", lock_config=True
  )
  flags.DEFINE_string("topology", None, "TPU slice: v5e-16, v5e-256, v5p-64, v5p-128, v4-32, v6e-8, or v5e:4x4.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN (multi-slice; mesh.data spans them).")
  flags.DEFINE_bool("max_batch", False, "Also search the largest per-chip batch that fits (several compiles).")
  flags.DEFINE_bool(
      "remat_search",
      False,
      "Also compile each remat policy, least recomputation first, and name the cheapest that fits "
      "(done anyway when the config's own policy does not fit).",
  )
  flags.mark_flags_as_required(["topology"])


def main(argv: list[str]) -> None:
  """Prints the fit table of `--config` on `--topology`, then its JSON line."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> for overrides.")
  f = flags.FLAGS
  topology.parse(f.topology, f.num_slices)  # bad names fail before anything compiles
  result = aot.check(f.config, f.topology, f.num_slices)
  search = None
  if f.remat_search:
    search = aot.cheapest_remat(f.config, f.topology, f.num_slices)
  elif not result["fits"]:
    # Only this policy unrolled, or policies that recompute more, can fit where it does not.
    search = aot.cheapest_remat(f.config, f.topology, f.num_slices, result["remat"], skip_first=True)
    search = search if search["tried"] else None
  if search is not None:
    result["remat_search"] = search["tried"]
    result["advice"] = aot.advice(result, search)
  lines = []
  if f.max_batch:
    found = aot.max_batch(f.config, f.topology, f.num_slices)
    result["max_batch_per_chip"] = found["max_batch_per_chip"]
    result["max_batch_compiles"] = found["compiles"]
    lines.append(_largest_line("largest batch that fits", found))
    unrolled = aot.unrolled(f.config)
    if unrolled is not None:  # several segments: unrolled may hold more, for the same FLOPs
      found = aot.max_batch(unrolled, f.topology, f.num_slices)
      result["max_batch_per_chip_unrolled"] = found["max_batch_per_chip"]
      result["max_batch_compiles_unrolled"] = found["compiles"]
      lines.append(_largest_line("with --config.model.scan_layers=False", found))
  print(aot.table(result))
  for line in lines:
    print(line)
  if result.get("advice"):
    print(result["advice"])
  sys.stdout.flush()
  print(json.dumps(jax.tree.map(_json_safe, result), sort_keys=True))


def _largest_line(label: str, found: dict) -> str:
  tried = ", ".join(map(str, found["compiles"]))
  return f"{label}: {found['max_batch_per_chip']} sequences per chip (compiled at {tried})"


def entry() -> None:
  """Console-script entry point (`cla-aot`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
