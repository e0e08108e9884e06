#!/usr/bin/env bash
# The CUDA benchmark in one prepared script (under 5 minutes on an H200): sampler throughput for fp16/bf16/fp32,
# eager vs torch.compile with CUDA graphs (reduce-overhead), batch 1..256; the DDPM-1000 baseline side by side;
# the roofline against the GPU's measured peak. Tables go to stdout, JSON to bench/results/ (and $OUT if set).
# It needs only torch and safetensors (the benchmarks import training/ and worker/engine.py, not the service), so
# it runs in a stock PyTorch CUDA image:  bench/gpu.sh  (PYTHON=... to pick the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

timeout 100 $PY -m bench.samplers --device cuda --precisions fp16,bf16,fp32 --compile off --samplers dpmpp:20 \
  --batches 1,16,64,256 --ddpm-batches "" --name samplers_cuda
timeout 90 $PY -m bench.samplers --device cuda --precisions fp16 --compile reduce-overhead --samplers dpmpp:20 \
  --batches 1,64,256 --ddpm-batches "" --name samplers_cuda_compiled
timeout 60 $PY -m bench.baseline --device cuda --batches 1,256
timeout 40 $PY -m bench.roofline --device cuda --precisions fp16,bf16 --batches 64,256 --compile off
if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/; fi
