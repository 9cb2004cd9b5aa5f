"""cla_jax: Cross-Layer Attention transformers in JAX/Flax."""

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
  # Lazy, so `import cla_jax` (e.g. for a CLI's --help) does not pull in jax, flax and orbax.
  if name == "load_model":
    from cla_jax.load import load_model  # pylint: disable=g-import-not-at-top

    return load_model
  raise AttributeError(f"module 'cla_jax' has no attribute {name!r}")
