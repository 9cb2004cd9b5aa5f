#!/usr/bin/env bash
# Sets up .venv, checks lint and format (scripts/lint.sh), then runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
bash scripts/lint.sh
# 8 fake CPU devices for the sharding tests; no LLVM optimisation (tiny programs, compile-bound).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
export JAX_PLATFORMS=cpu
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"  # see run.sh
exec .venv/bin/python -m pytest -q -n 2 tests "$@"
