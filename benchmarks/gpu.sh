#!/usr/bin/env bash
# The GPU benchmarks (overhead, Hessian, scaling) in under 8 minutes on one CUDA GPU;
# a reduced version without one. Writes results.json and results.md to the folder given
# (default benchmarks/results/gpu). See benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu.py --out "${1:-benchmarks/results/gpu}" "${@:2}"
