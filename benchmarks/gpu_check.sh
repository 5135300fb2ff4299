#!/usr/bin/env bash
# The prepared one-GPU check: bf16 throughput (ours / bare loop / diffusers), trainer=fsdp on one device with
# the EMA under sharding compared against an unsharded run, and compile=true; one JSON, under 8 minutes.
#   bash benchmarks/gpu_check.sh                        # writes benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check.json"
# Needs the project's environment (make install; or PYTHON=… with the dependencies importable) and a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU machine")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@"
