#!/usr/bin/env bash
# Every GPU check in one go, ending with one summary table (issue: "On a GPU: both jobs
# seen working and GPU-bound"). On the GPU machine (from the project root, with .gpu/
# and a 12,000-image .gpudata/ carried in one call; `bash bench/gpu-prep.sh` builds them
# here, and .gpux/ too, for a machine without matplotlib or pytest: see its header):
#
#   source .gpu/gpu-env.sh && bash .gpudata/unpack.sh && bash bench/gpu.sh
#
# Steps: tests/test_gpu.py; bench/train_throughput.py (ViT-B/16 at 224, bf16, batch 128,
# against the plain bf16 step); bench/predict_throughput.py (ViT-B/16 at 224, batch 256,
# over 200,000 hard links of the carried images in nested folders, against the plain
# forward); jobs/tune.py with the baseline's arithmetic (ViT-B/16 at 224, 3 epochs, lr
# 2e-5, batch 32) on the carried sample, its time split, and the time projected for the
# full 36k training images. Sized to finish in under 8 minutes on one H100 or H200.
#
# Without CUDA it runs the same steps in a small CPU mode (tiny ViT at 32 px, small
# samples) in a few minutes, so that the script is known to work before device time is
# spent on it. A failed step is reported in the table; the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/gpu-common.sh
OUT=${GPU_BENCH_OUT:-bench/out/gpu}
mkdir -p "$OUT"
IMAGES=$(ls "$DATA/images" | wc -l)

if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  MODE=gpu
  DEVICE=$($PY -c 'import torch; print(torch.cuda.get_device_name())')
  TRAIN="--vit-size base --image-size 224 --batch-size 128 --rows $IMAGES --epochs 4"
  PREDICT="--vit-size base --image-size 224 --batch-size 256 --tree 200000 --ceiling 0"
  # The pretrained recipe's values with random weights (--from-scratch alone would take scratch-gpu's).
  BASELINE="--recipe pretrained --vit-size base --image-size 224 --epochs 3 --lr 2e-5 --batch-size 32"
else
  MODE=cpu
  DEVICE="$(nproc) CPUs (no CUDA: small CPU mode)"
  TRAIN="--vit-size tiny --image-size 32 --batch-size 64 --rows 2000 --epochs 3"
  PREDICT="--vit-size tiny --image-size 32 --batch-size 64 --tree 5000 --ceiling 2000"
  BASELINE="--vit-size tiny --image-size 32 --epochs 1 --lr 3e-4 --batch-size 32 --limit 1500"
fi
echo "gpu.sh: $MODE mode on $DEVICE; $IMAGES images in $DATA; logs in $OUT"

step() {  # step NAME COMMAND...: run, log, time
  local name=$1; shift
  local t0=$SECONDS
  echo "--- $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}
: >"$OUT/steps.txt"

step tests env FASHION_SMALL="$DATA" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
step train $PY bench/train_throughput.py --data "$DATA" $TRAIN
step predict $PY bench/predict_throughput.py --data "$DATA" --work "$OUT/predict" $PREDICT
rm -rf "$OUT/baseline"
step baseline $PY jobs/tune.py --data-dir "$DATA" --from-scratch $BASELINE --output-dir "$OUT/baseline"

$PY - "$OUT" "$DEVICE" "$MODE" <<'PY'
import json, re, sys
from pathlib import Path

out, device, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
steps = dict(line.split(" ", 1) for line in (out / "steps.txt").read_text().splitlines())


def grab(name, pattern, cast=float):
    try:
        m = re.search(pattern, (out / f"{name}.log").read_text())
        return cast(m.group(1)) if m else None
    except OSError:
        return None


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


rows = []
tests = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
summary = (re.findall(r"^=*\s*(\d+ \w+.*) in [\d.]+s", tests, re.M) or ["no result"])[-1]
rows.append(("tests/test_gpu.py", summary, "all pass", steps.get("tests", "")))

plain, ours = grab("train", r"median plain training step: ([\d.]+)"), grab("train", r"median project training .*?: ([\d.]+)")
ratio = ours / plain if plain and ours else None
rows.append(("training img/s (project / plain step)", f"{fmt(ours)} / {fmt(plain)} = {fmt(ratio, '.3f')}", ">= 0.9", steps.get("train", "")))

forward = grab("predict", r"median plain forward: ([\d.]+)")
steady = grab("predict", r"job steady rate \(first prediction to last\): ([\d.]+)")
whole = grab("predict", r"job wall: [\d.]+ s, ([\d.]+) img/s")
ratio = steady / forward if forward and steady else None
rows.append(("batch inference steady img/s (job / plain forward)", f"{fmt(steady)} / {fmt(forward)} = {fmt(ratio, '.3f')}", ">= 0.8", steps.get("predict", "")))
rows.append(("batch inference whole process img/s (Ray start included)", fmt(whole), "reported", ""))

try:
    s = json.loads((out / "baseline" / "summary.json").read_text())
    t, train_rows = s["timings"], s["data"]["split_sizes"]["train"]
    history = s["trials"][0]["history"]
    epochs = sum(r["epoch_seconds"] for r in history)
    rate = sorted(r["images_per_second"] for r in history)[len(history) // 2]
    # The epochs scale with the training images; the rest (data, Ray, decode, test) is paid once.
    scale = 36_000 / train_rows
    fixed = t["data_load_s"] + t["ray_start_s"] + t["decode_s"] * scale + t["test_and_export_s"] * scale
    projected = fixed + epochs * scale + (t["tune_s"] - epochs)
    split = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items())
    rows.append(("baseline arithmetic, this sample", f"{sum(t.values()):.0f}s for {train_rows} train images ({split}); {rate:.0f} img/s", "", steps.get("baseline", "")))
    rows.append(("baseline projected for 36k train images", f"{projected / 60:.1f} min", "< 3 min on one H200" if mode == "gpu" else "(CPU mode)", ""))
except (OSError, KeyError, ValueError) as e:
    rows.append(("baseline", f"no summary ({type(e).__name__})", "", steps.get("baseline", "")))

print(f"\n## bench/gpu.sh on {device}\n")
print("| what | measured | target | step |")
print("| --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY
