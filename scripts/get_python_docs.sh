#!/usr/bin/env bash
# Makes sure the default corpus (Python 3.11 docs reST from Debian's python3.11-doc) is prepared in DATA_DIR:
# installs the package with apt when root (else `apt-get download` + `dpkg-deb -x` into DATA_DIR), then builds
# the cla_python_docs TFDS dataset. Idempotent; prints one line when everything is already there.
#   bash scripts/get_python_docs.sh [DATA_DIR]   (default: ~/.cache/cla_jax, the configs' data.data_dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" -m cla_jax.cli.python_docs --data_dir="${1:-$HOME/.cache/cla_jax}"
