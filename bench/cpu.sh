#!/usr/bin/env bash
# Every CPU benchmark of BENCHMARKS.md in one run (about 25 minutes on 2 cores); run it on a quiet machine.
# Tables go to stdout, JSON to bench/results/. Needs `make test` or `make demo` to have built .venv, and wrk
# (apt-get install wrk) for the API load test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
$PY -m bench.samplers --precisions bf16,fp32 --batches 1,4,16,64 --ddpm-batches 1
$PY -m bench.roofline --precisions bf16,fp32 --batches 1,16,64 --compile off,default
$PY -m bench.baseline --batches 1,32
# the few-step student against DDPM-1000 and the served default, when checkpoints/ holds a student of the served model
if $PY -c 'import sys; from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, LATEST, served_versions; sys.exit(served_versions(BUNDLED_CHECKPOINTS, LATEST)[1] is None)'; then
  $PY -m bench.student --batch 32
else
  echo "bench.student skipped: no distilled student of the served model under checkpoints/ (python -m training distill)"
fi
$PY -m bench.api_e2e --clients 32
$PY -m bench.api_cpu --requests 12000 --concurrency 16
$PY -m bench.api_load --clients 64 --seconds 10 --workers 1,2
$PY -m bench.upload_memory --concurrent 8
