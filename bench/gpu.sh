#!/usr/bin/env bash
# The CUDA benchmark in one prepared script, under 8 minutes on one H200 (BUDGET_S, default 450 s, bounds the
# stages; each gets its own timeout, clipped to what is left). A stage that fails or times out does not stop the
# others: after every stage its log and every results file so far are copied to $OUT (when set), and
# bench/results/gpu/gpu_summary.json is rewritten (stage exit codes and seconds, every benchmark's JSON, the headline
# figures). Stages, most important first:
#   checks    batch invariance at batch 1/8/32 in fp16, fp16-vs-fp32 PSNR on the same seeds, a provoked precision
#             fallback and the unprovoked count, peak memory by batch, no host sync in the sampling loop
#   student   the distilled student at 1/2/4 steps against the served default and DDPM 1000: fp16, CUDA graphs
#             (reduce-overhead), batch 256, images/s, the ratio to DDPM 1000 and batch-1 latency (needs a student
#             under checkpoints/; without one the stage says so and exits 1)
#   compile   torch.compile (reduce-overhead = CUDA graphs): seconds per bucket, graphs compiled by jobs afterwards,
#             compiled vs eager images/s
#   samplers  eager throughput fp16/bf16/fp32, DPM-Solver++ 20, batch 1..256
#   baseline  DDPM 1000 vs DPM-Solver++ 20: the sampler alone (same batch) and sampler + batching, apart
#   ddp       torchrun, one process, NCCL: train, stop, resume; weights against a straight run
#   roofline  fp16/bf16 against the GPU's measured peak
# It needs only torch and safetensors (no service, no Redis), so a stock PyTorch CUDA image runs it:
#   bench/gpu.sh        (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh needs torch with a CUDA GPU ($PY sees none); the CPU benchmarks are bench/cpu.sh" >&2
  exit 2
fi
BUDGET_S=${BUDGET_S:-450}
RESULTS=bench/results/gpu
export BENCH_RESULTS=$PWD/$RESULTS PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.json "$RESULTS"/*.log "$RESULTS"/gpu_stages.jsonl
START=$(date +%s)

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 left rc started
  shift 2
  left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 20)); then
    echo "{\"stage\": \"$name\", \"skipped\": \"budget spent\"}" >>"$RESULTS/gpu_stages.jsonl"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (timeout ${limit} s, ${left} s of the budget left)"
  started=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  echo "{\"stage\": \"$name\", \"exit_code\": $rc, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false), \"seconds\": $(($(date +%s) - started)), \"timeout_s\": $limit}" >>"$RESULTS/gpu_stages.jsonl"
  $PY -m bench.gpu_summary >/dev/null || true
  if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$RESULTS"/*.jsonl "$RESULTS"/*.log "$OUT"/ 2>/dev/null || true; fi
  return 0
}

stage info 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))\"" || true
stage checks 75 $PY -m bench.gpu_checks --device cuda --checks invariance,precision,fallback,memory,sync || true
stage student 180 $PY -m bench.student --device cuda --precision fp16 --batch 256 --compile reduce-overhead \
  --student-steps 1,2,4 --latency || true
stage compile 200 $PY -m bench.gpu_checks --device cuda --checks compile --compile-mode reduce-overhead --name gpu_compile || true
stage samplers 60 $PY -m bench.samplers --device cuda --precisions fp16,bf16,fp32 --compile off --samplers dpmpp:20 \
  --batches 1,16,64,256 --ddpm-batches "" --name samplers_cuda || true
stage baseline 50 $PY -m bench.baseline --device cuda --batches 1,32,256 || true
stage ddp 90 $PY -m bench.ddp_resume --device cuda --steps 4 || true
stage roofline 35 $PY -m bench.roofline --device cuda --precisions fp16,bf16 --batches 64,256 --compile off || true
$PY -m bench.gpu_summary || true
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$RESULTS"/*.jsonl "$RESULTS"/*.log "$OUT"/ 2>/dev/null || true; fi
echo "=== done in $(($(date +%s) - START)) s"
