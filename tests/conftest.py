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


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """`fast_case(id)`: the other cases of that parametrized test are `slow` (each compiles its own model)."""
  for item in items:
    marker = item.get_closest_marker("fast_case")
    if marker and item.callspec.id != marker.args[0]:
      item.add_marker(pytest.mark.slow)


# Skips that `--fail-on-unexpected-skips` (test.sh) accepts: no GPU on the machine, and no root to mount the
# small disks of the disk-full tests. Any other skip (a missing extra, an import error turned into a skip)
# would silently shrink the suite, so test.sh fails on it.
EXPECTED_SKIPS = ("needs a CUDA GPU", "needs root")
_unexpected_skips: list[str] = []


def pytest_addoption(parser):
  parser.addoption(
      "--fail-on-unexpected-skips",
      action="store_true",
      help=f"fail the run when a test or module is skipped for a reason other than {EXPECTED_SKIPS}",
  )


def _record_skip(report) -> None:
  """Keeps a skip (longrepr: path, line, "Skipped: reason") whose reason is not one of EXPECTED_SKIPS."""
  if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
    reason = str(report.longrepr[2])
    if not any(expected in reason for expected in EXPECTED_SKIPS):
      _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_collectreport(report):
  _record_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # pylint: disable=unused-argument
  if _unexpected_skips and config.getoption("--fail-on-unexpected-skips"):
    terminalreporter.section("unexpected skips (each one is a failure here)", red=True)
    for line in _unexpected_skips:
      terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
  if _unexpected_skips and session.config.getoption("--fail-on-unexpected-skips") and exitstatus == 0:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
