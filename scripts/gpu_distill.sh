#!/usr/bin/env bash
# Distil the served model's few-step student on a lent CUDA GPU in one call, from a bare checkout:
#   1. the synthetic faces (`python -m training synth`, every core; data/ does not travel),
#   2. `python -m training distill` for MINUTES (the latent encoding included) on the GPU, going on from the student
#      folder INIT_FROM (--init-from: a student of the served model); unset, from the student the checkpoints
#      serve beside the model when they hold one; INIT_FROM= (empty) or no student: from the teacher,
#   3. ROUNDS (default 0) more runs of MINUTES each, for a jump student (--student-jumps true ...): each goes on
#      from the student before it and learns its rollouts (--rollouts ROLLOUTS, default 1024),
#   4. every student this call exported copied to $OUT/diffusion/VERSION (when OUT is set), with the runs' log.
# Nothing but torch, safetensors, pillow and tqdm is needed, so the device's own python3 runs it:
#   MINUTES=8 scripts/gpu_distill.sh          (DEVICE=cpu COUNT=64 MINUTES=0.5 BATCH=8: the same path on a CPU)
# Its arguments go to every `distill` run as they are, e.g. a jump student from the teacher and two rounds:
#   INIT_FROM= ROUNDS=2 scripts/gpu_distill.sh --method trajectory-consistency --student-skeleton-steps 20 \
#     --student-jumps true --student-fresh-noise 0 --student-max-steps 4 --trajectories 65536
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MINUTES=${MINUTES:-8}
ROUNDS=${ROUNDS:-0}
ROLLOUTS=${ROLLOUTS:-1024}
DEVICE=${DEVICE:-cuda}
COUNT=${COUNT:-30000}
BATCH=${BATCH:-256}
DATA=${DATA:-data/synth}
WORK=${WORK:-runs/gpu-distill}
CHECKPOINTS=${CHECKPOINTS:-checkpoints}

served() {  # the served model of a checkpoints folder and its student (empty when none), one per line
  $PY -c 'import sys; from facegen.model.checkpoints import served_versions
print(*(v or "" for v in served_versions(sys.argv[1], "latest")), sep="\n")' "$1"
}
{ read -r teacher; read -r bundled_student; } < <(served "$CHECKPOINTS")
INIT_FROM=${INIT_FROM-${bundled_student:+$CHECKPOINTS/diffusion/$bundled_student}}

if [ ! -f "$DATA/list_attr_celeba.txt" ]; then
  $PY -m training synth --out "$DATA" --count "$COUNT" --seed 0 --workers "$(nproc)"
fi
mkdir -p "$WORK"
roots="$WORK/checkpoints"
rm -rf "$roots" "$WORK"/run* "$WORK/distill.log" && mkdir -p "$roots" && cp -r "$CHECKPOINTS/vae" "$CHECKPOINTS/diffusion" "$roots"/
exported=()

distill_from() {  # one run into $WORK/run-$1 going on from the student $2 (empty: the teacher); the rest to distill
  local run=$1 from=$2 init=()
  shift 2
  if [ -n "$from" ]; then init=(--init-from "$from"); fi
  $PY -m training distill --data "$DATA" --checkpoints "$roots" --teacher "$teacher" --run-dir "$WORK/run-$run" \
    --device "$DEVICE" --batch-size "$BATCH" --minutes "$MINUTES" --export-dtype fp16 --latent-cache "$WORK/latents" \
    --log-every 100 "${init[@]}" "$@" 2>&1 | tee -a "$WORK/distill.log"
  student=$(served "$roots" | tail -1)  # the newest student of the teacher: this run's
  exported+=("$student")
  echo "student: $roots/diffusion/$student (from ${from:-the teacher $teacher})"
}
distill_from 0 "$INIT_FROM" "$@"
for round in $(seq 1 "$ROUNDS"); do
  distill_from "$round" "$student" --rollouts "$ROLLOUTS" "$@"
done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/diffusion"
  for version in "${exported[@]}"; do cp -r "$roots/diffusion/$version" "$OUT/diffusion/"; done
  cp "$WORK/distill.log" "$OUT/"
  for run in "$WORK"/run-*; do cp "$run/log.jsonl" "$OUT/$(basename "$run").jsonl" 2>/dev/null || true; done
fi
