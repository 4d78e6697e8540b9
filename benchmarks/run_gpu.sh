#!/usr/bin/env bash
# The GPU benchmark (issue #4 §4), for a machine with one CUDA GPU, from the repository root. A few minutes on an
# H100. Writes benchmarks/results/gpu/ (CSV, JSON, Markdown with the device string, scaling plots).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
exec "$PY" -m l2vit bench --suite benchmarks/suites/gpu.yaml --out "$OUT"
