#!/usr/bin/env bash
# The scratch recipe on a GPU, through jobs/tune.py itself, on all of fashion-small (issue:
# "Without pretrained weights on a GPU: 97 % and a real macro-F1 in 10 minutes"). On the
# GPU machine, after the two calls that bench/gpu-prep.sh describes:
#
#   source .gpu/gpu-env.sh && test -f /tmp/fashion-small/styles.csv && bash bench/gpu-recipe.sh [tune.py flags]
#
# Runs `jobs/tune.py --data-dir $DATA --from-scratch` (the workers have a GPU, so the
# scratch-gpu recipe), timed as a whole, with the GPU's utilisation sampled every 2 s;
# then, with the time left of GPU_RECIPE_BUDGET seconds, tests/test_gpu.py. Small
# outputs (summary.json, report.md, logs, plots) land in GPU_BENCH_OUT. Without CUDA it
# runs the same on --limit 600 --epochs 2, to try the script.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu-common.sh
OUT=${GPU_BENCH_OUT:-bench/out/gpu-recipe}
BUDGET=${GPU_RECIPE_BUDGET:-570}
RUN=$(mktemp -d)/recipe  # the model and Ray's experiment stay out of OUT: too big to bring back
mkdir -p "$OUT"
extra=()
if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 >"$OUT/gpu_util.csv" &
  sampler=$!
else
  echo "gpu-recipe.sh: no CUDA: a small CPU try of the script" | tee "$OUT/gpu.txt"
  extra=(--recipe scratch-gpu --limit 600 --epochs 2)
fi

t0=$SECONDS
timeout $((BUDGET - 25)) $PY jobs/tune.py --data-dir "$DATA" --from-scratch --output-dir "$RUN" ${extra[@]+"${extra[@]}"} "$@" \
  >"$OUT/tune.log" 2>&1
echo "tune.py rc=$? wall $((SECONDS - t0))s" | tee "$OUT/steps.txt"
[ -n "${sampler:-}" ] && kill "$sampler"
cp "$RUN"/summary.json "$RUN"/report.md "$RUN"/*.png "$OUT"/ 2>/dev/null
grep -E "^epoch |^accuracy|^best trial|^time:|GPU workers" "$OUT/tune.log" | tail -40
[ -f "$OUT/gpu_util.csv" ] && awk -F', ' '{gsub(/ %/,"",$2); s+=$2; n++} END {if (n) printf "GPU utilisation: mean %.0f %% over %d samples\n", s/n, n}' "$OUT/gpu_util.csv"

left=$((BUDGET - SECONDS))
if [ "$left" -gt 60 ]; then
  t1=$SECONDS
  timeout "$left" env FASHION_SMALL="$DATA" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$OUT/test_gpu.log" 2>&1
  echo "test_gpu.py rc=$? $((SECONDS - t1))s" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/test_gpu.log"
else
  echo "test_gpu.py not run: ${left}s left" | tee -a "$OUT/steps.txt"
fi
