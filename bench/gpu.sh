#!/usr/bin/env bash
# The CUDA benchmark in one prepared script (under 5 minutes on an H200): sampler throughput for fp16/bf16/fp32,
# eager vs torch.compile with CUDA graphs (reduce-overhead), batch 1..256; the DDPM-1000 baseline side by side;
# the roofline against the GPU's measured peak. Tables go to stdout, JSON to bench/results/ (and $OUT if set).
#
#   bench/gpu.sh fetch   # on the dev machine: download the pure-Python wheels the GPU image lacks into .whl/
#   bench/gpu.sh         # on the CUDA machine (the device tool: carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS="pydantic==2.* pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv"

if [ "${1:-}" = fetch ]; then
  for spec in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
  done
  ls .whl
  exit 0
fi

export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/facegen-site .whl/*.whl
  export PYTHONPATH=/tmp/facegen-site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

timeout 100 $PY -m bench.samplers --device cuda --precisions fp16,bf16,fp32 --compile off --samplers dpmpp:20 \
  --batches 1,16,64,256 --ddpm-batches "" --name samplers_cuda
timeout 90 $PY -m bench.samplers --device cuda --precisions fp16 --compile reduce-overhead --samplers dpmpp:20 \
  --batches 1,64,256 --ddpm-batches "" --name samplers_cuda_compiled
timeout 60 $PY -m bench.baseline --device cuda --batches 1,256
timeout 40 $PY -m bench.roofline --device cuda --precisions fp16,bf16 --batches 64,256 --compile off
if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/; fi
