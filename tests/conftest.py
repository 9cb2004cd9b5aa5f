"""Shared test fixtures: small configs that run in seconds on CPU."""

import os
import sys

# The sharding tests need several devices; test.sh sets this too, but keep a direct `pytest` honest.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Test programs are tiny: LLVM optimisation costs far more compile time than it saves at run time.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Test helpers are imported one way, as `from tests import train_helpers` (tests/ is a namespace package
# under the repo root).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """The default config shrunk to a model and run that finish in seconds."""
  from tests import train_helpers  # pylint: disable=g-import-not-at-top

  return train_helpers.tiny_config()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small text corpus and a cache dir for it (train_helpers.use_corpus), with jax's compilation cache on."""
  from tests import train_helpers  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("corpus")
  train_helpers.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  return train_helpers.write_corpus(root / "text"), str(root / "cache")
