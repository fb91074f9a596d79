#!/usr/bin/env bash
# The GPU check in one command, for a machine lent for a few minutes (under 4 on one H200):
#   pip install --no-build-isolation --no-deps -e .   # once, in a copy of the repository
#   bash scripts/gpu_check.sh                         # or --cpu: the smoke test, GPUs hidden
# It prints one table (check, result, figures) and exits 1 if a correctness row failed; a speed
# goal missed (BELOW) never fails it. Options: --cpu, --quick, --out DIR (writes DIR/gpu.json).
# Needs torch, triton and sptutor only (no network); see docs/kernels.md, "The GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m sptutor.bench.gpu "$@"
