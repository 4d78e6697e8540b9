#!/usr/bin/env bash
# The CPU mixer benchmark (issue #7 §3): run it on a quiet machine (nothing else using the CPUs), from the
# repository root. 20 minutes on 2 quiet cores (measured).
# Writes benchmarks/results/cpu_mixers/{mixers.csv,mixers.json,mixers.md,mixers_alone_*.png,mixers_backbone_*.png}:
# every mixer's time and peak memory alone against tokens and inside l2vit_tiny against pixels, with fitted log-log
# slopes (1: linear, 2: quadratic).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/cpu_mixers}
# threads per benchmark process (PyTorch and OpenMP); the suite runs 2, as on the project machines
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m l2vit bench --suite benchmarks/suites/cpu_mixers.yaml --threads "$OMP_NUM_THREADS" --out "$OUT"
