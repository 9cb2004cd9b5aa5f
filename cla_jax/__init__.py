"""cla_jax: Cross-Layer Attention transformers in JAX/Flax."""

import glob
import os
from typing import Any

__all__ = ["load_model"]


def _quiet_libtpu_without_tpu() -> None:
  """With libtpu installed (the test extra) but no TPU attached, jax still loads it at backend start-up, and it
  logs errors about the missing Cloud TPU metadata; these defaults (ignored on a TPU VM) keep CPU runs quiet."""
  google_vendor = "0x1ae0"  # PCI vendor id of Google's TPU chips (jax's hardware_utils checks the same)
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == google_vendor:
          return
    except OSError:
      continue
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: compile-only processes may overlap
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # any valid name; compile-only slices name their own


_quiet_libtpu_without_tpu()


def __getattr__(name: str) -> Any:
  # Lazy, so `import cla_jax` (e.g. for a CLI's --help) does not pull in jax, flax and orbax.
  if name == "load_model":
    from cla_jax.load import load_model  # pylint: disable=g-import-not-at-top

    return load_model
  raise AttributeError(f"module 'cla_jax' has no attribute {name!r}")
