#!/usr/bin/env bash
# Lint (ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade) and format check (pyink: 2-space
# Google style, 120 columns), both configured in pyproject.toml. Fix with: ruff check --fix . && pyink .
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m ruff check .
"$PY" -m pyink --check .
