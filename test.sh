#!/usr/bin/env bash
# Sets up .venv at the pinned versions (constraints.txt), checks lint and format (scripts/lint.sh), runs the
# Hugging Face tests under the oldest supported transformers (.venv-oldest from constraints-oldest.txt;
# OLDEST=0 skips it), then the whole test suite on CPU.
#   bash test.sh [pytest args...]   (with args: only the main suite, with those args)
#   UPGRADE=1 bash test.sh          the suite against the newest releases setup.py allows, in .venv-upgrade;
#                                   when it passes, constraints.txt is rewritten with what ran (review, commit)
#   bash test.sh -m "not slow"      the fast tier only (no subprocesses, no end-to-end training)
# Every skip is listed with its reason (-rs); one other than "no GPU" or "no root to mount" fails the run
# (--fail-on-unexpected-skips, tests/conftest.py): a missing extra must not shrink the suite unnoticed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
[ "${UPGRADE:-0}" = 1 ] && VENV=.venv-upgrade
VENV=$VENV bash scripts/setup_env.sh
PYTHON="$VENV/bin/python" bash scripts/lint.sh
# 8 fake CPU devices for the sharding tests; no LLVM optimisation (tiny programs, compile-bound).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
export JAX_PLATFORMS=cpu
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"  # see run.sh
if [ "${UPGRADE:-0}" != 1 ] && [ "${OLDEST:-1}" = 1 ] && [ $# -eq 0 ]; then
  VENV=.venv-oldest CONSTRAINTS=constraints-oldest.txt bash scripts/setup_env.sh
  echo "oldest supported transformers: $(.venv-oldest/bin/python -c 'import transformers as t; print(t.__version__)')"
  .venv-oldest/bin/python -m pytest -q -n 2 -rs --fail-on-unexpected-skips tests/test_export_hf.py tests/test_convert_hf.py
fi
"$VENV/bin/python" -m pytest -q -n 2 -rs --fail-on-unexpected-skips tests "$@"
if [ "${UPGRADE:-0}" = 1 ] && [ $# -eq 0 ]; then  # only a whole-suite pass raises the pins
  {
    echo "# The exact versions the test suite last passed with; UPGRADE=1 bash test.sh rewrites this file."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check
  } > constraints.txt
  echo "constraints.txt rewritten from $VENV (git diff constraints.txt shows what moved)"
fi
