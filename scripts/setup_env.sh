#!/usr/bin/env bash
# Creates a venv (if missing) and installs cla_jax with its test extras from this checkout, at the exact
# versions the test suite was last run with, so a new release on the registry cannot change what runs.
#   VENV=.venv                     the venv to create or update
#   CONSTRAINTS=constraints.txt    the pins (constraints-oldest.txt: the oldest supported transformers)
#   UPGRADE=1                      no pins: the newest releases setup.py allows (see test.sh, which then
#                                  rewrites constraints.txt when the suite passes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# setuptools warns about editable installs of packages mapped from other folders (configs/ -> cla_jax.configs)
# with a screenful of asterisks; it is expected here.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"
install=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${UPGRADE:-0}" = 1 ]; then
  "${install[@]}" --upgrade pip
  "${install[@]}" --upgrade --upgrade-strategy eager -e '.[test]'
else
  "${install[@]}" -c "$CONSTRAINTS" pip
  "${install[@]}" -c "$CONSTRAINTS" -e '.[test]'
fi
