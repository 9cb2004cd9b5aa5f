#!/usr/bin/env bash
# Quick start: set up .venv, prepare the default corpus (Python 3.11 docs), train the default
# MQA+CLA2 model on CPU, report its validation perplexity, then let it continue a prompt.
#   bash run.sh [WORKDIR] [extra train.py flags...]     (default WORKDIR: runs/default)
set -euo pipefail
cd "$(dirname "$0")"
WORKDIR=${1:-runs/default}
shift || true
bash scripts/setup_env.sh
bash scripts/get_python_docs.sh
# Transparent huge pages for malloc (glibc >= 2.35; ignored elsewhere): XLA's CPU runtime allocates each
# step's buffers afresh, and with 4 KiB pages a train step spends ~10% of its time in page faults.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
.venv/bin/python train.py --config=configs/default.py --workdir="$WORKDIR" "$@"
.venv/bin/python eval.py --workdir="$WORKDIR"
.venv/bin/python generate.py --workdir="$WORKDIR" --prompt="The dictionary" --max_new_tokens=40
