#!/usr/bin/env bash
# The committed CPU benchmark (issue #4): run it on a quiet machine (nothing else using the CPUs), from the
# repository root. About 11-13 minutes on 2 cores (11.5 measured on 2026-12-05, with the frozen-compiled sweeps).
# Writes benchmarks/results/cpu/{results.csv,results.json,results.md,scaling_*.png}; results.md ends with the
# issue's section 3 targets, each measured and marked met or missed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/cpu}
# threads per benchmark process (PyTorch and OpenMP); the suite runs 2, as on the project machines
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m l2vit bench --suite benchmarks/suites/cpu.yaml --threads "$OMP_NUM_THREADS" --out "$OUT"
