"""Batch inference throughput: jobs/batch_predict.py end to end against plain PyTorch
over the same files and the same model, measured in one run.

    python bench/predict_throughput.py --images 20000 --vit-size tiny --image-size 224
    python bench/predict_throughput.py --tree 1000000 --vit-size tiny --image-size 32 --image-size-source 43x32

Inputs: --images N links N images of ../shared/data/fashion-small into one folder;
--tree N makes N hard links of them (cycling through the set) in 400 nested folders
(20 x 20), as a crawl would lay them out. Both are cached under --work.

References, each in this one run:
- plain forward: the model alone over batches already decoded, resized and normalised
  on the device (bf16 autocast on a GPU, as the job): the arithmetic ceiling;
- plain loop: one process reads, decodes, preprocesses and runs the model in batches;
- plain ceiling (--ceiling N, on N of the same files): a pool of decode processes (one
  per CPU but one) feeds the main process, which runs the model: what one machine can
  do for the whole job without Ray.
The job runs as its own process (Ray start, listing and the merged CSV included); it
reports its wall time, rate, the driver's peak RSS, the time from its start to its first
prediction, and its steady rate (first prediction to last). Ratios last.
Needs ../shared/data/fashion-small (or --data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fashion_vit.config import MASTER_CATEGORIES, TrainConfig  # noqa: E402
from fashion_vit.model import create_model, load_checkpoint, save_checkpoint  # noqa: E402
from fashion_vit.transforms import Preprocessing, decode_image, preprocess  # noqa: E402

# Runs the job in a process of its own and reports what only that process knows.
JOB_WRAPPER = """
import json, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from jobs import batch_predict
from fashion_vit import predict
cfg = batch_predict.parse_args(sys.argv[2:]).validate()
started = time.perf_counter() - t0
outcome = predict.run(cfg, log=lambda *a: None)
timings = dict(getattr(outcome, "timings", {}) or {})
if "first_prediction_s" in timings:
    timings["first_prediction_s"] += started
print("BENCH " + json.dumps({"predicted": outcome.predicted, "failed": outcome.failed, "timings": timings,
                             "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_folder(data: Path, n: int, dest: Path) -> Path:
    images = sorted((data / "images").iterdir())[:n]
    if len(images) < n:
        sys.exit(f"only {len(images)} images in {data}")
    dest.mkdir(parents=True, exist_ok=True)
    for p in images:
        link = dest / p.name
        if not link.exists():
            os.symlink(p, link)
    return dest


def make_tree(data: Path, n: int, dest: Path) -> Path:
    """n hard links of the real images in 20 x 20 nested folders; kept for reuse."""
    done = dest / ".complete"
    if done.exists() and done.read_text() == str(n):
        return dest
    images = sorted((data / "images").iterdir())
    for i in range(n):
        src = images[i % len(images)]
        folder = dest / f"d{i % 20:02d}" / f"e{(i // 20) % 20:02d}"
        if i < 400:
            folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{i:08d}-{src.name}"
        if not link.exists():
            try:
                os.link(src, link)
            except OSError:  # another filesystem: a symlink reads the same
                os.symlink(src, link)
    done.write_text(str(n))
    return dest


def files_under(folder: Path, limit: int | None = None) -> list[str]:
    paths = sorted(str(Path(d) / f) for d, _, names in os.walk(folder) for f in names if not f.startswith("."))
    return paths[:limit] if limit else paths


def plain_loop(paths: list[str], model_path: Path, batch_size: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    model, prep = load_checkpoint(str(model_path)).build()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            x = torch.from_numpy(np.stack([decode_image(Path(p).read_bytes(), prep.source_size) for p in chunk]))
            model(pixel_values=preprocess(x, prep)).logits.softmax(1).max(1)
    return len(paths) / (time.perf_counter() - t0)


def _decode_chunk(args) -> np.ndarray:
    chunk, source_size = args
    return np.stack([decode_image(Path(p).read_bytes(), source_size) for p in chunk])


def plain_ceiling(paths: list[str], model_path: Path, batch_size: int) -> float:
    """Decode in worker processes while the main process runs the model."""
    model, prep = load_checkpoint(str(model_path)).build()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    torch.set_num_threads(os.cpu_count() or 1)
    chunks = [(paths[i : i + batch_size], prep.source_size) for i in range(0, len(paths), batch_size)]
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    t0 = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool, torch.inference_mode(), autocast:
        for images in pool.map(_decode_chunk, chunks, chunksize=1):
            x = torch.from_numpy(images).to(device, non_blocking=True)
            model(pixel_values=preprocess(x, prep)).logits.softmax(1).max(1).values.cpu()
    return len(paths) / (time.perf_counter() - t0)


def plain_forward(paths: list[str], model_path: Path, batch_size: int, steps: int = 20) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    model, prep = load_checkpoint(str(model_path)).build()
    model.to(device)
    raw = torch.from_numpy(
        np.stack([decode_image(Path(p).read_bytes(), prep.source_size) for p in paths[: batch_size * 4]])
    )
    batches = [preprocess(raw[i : i + batch_size].to(device), prep) for i in range(0, len(raw), batch_size)]
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for x in batches:  # warm-up
            model(pixel_values=x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            model(pixel_values=batches[i % len(batches)]).logits.softmax(1).max(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def job(
    folder: Path,
    model_path: Path,
    out: Path,
    batch_size: int,
    repo: Path,
    engine: str | None = None,
    extra: list[str] | None = None,
) -> dict:
    """jobs/batch_predict.py of `repo` in its own process: its BENCH report, with the
    wall time and the whole-process rate (and the steady one, first prediction to last)."""
    argv = ["--input", str(folder), "--model", str(model_path), "--output", str(out), "--batch-size", str(batch_size)]
    if engine:
        argv += ["--engine", engine]
    if repo == ROOT:
        argv.append("--quiet")
    argv += extra or []
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", JOB_WRAPPER, str(repo), *argv], cwd=repo, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("BENCH "))[6:])
    report["wall_s"] = wall
    n = report["predicted"] + report["failed"]
    report["rate"] = n / wall
    t = report["timings"]
    if "predict_first_s" in t:
        report["steady_rate"] = n / (t["predict_s"] - t["predict_first_s"])
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--images", type=int, default=20000, help="a flat folder of this many images")
    p.add_argument("--tree", type=int, help="instead, this many hard links in 400 nested folders")
    p.add_argument("--ceiling", type=int, default=20000, help="files for the plain loop and ceiling (0: skip them)")
    p.add_argument("--vit-size", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", default="80x60", help="HxW the model's images are decoded to")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=1, help="paired runs; medians reported")
    p.add_argument(
        "--repo", type=Path, default=ROOT, help="run jobs/batch_predict.py of this checkout (a before/after)"
    )
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()

    if args.tree:
        folder = make_tree(args.data, args.tree, args.work / f"tree-{args.tree}")
    else:
        folder = make_folder(args.data, args.images, args.work / f"images-{args.images}")
    paths = files_under(folder, args.ceiling or 256)
    model_path = args.work / f"vit-{args.vit_size}-{args.image_size}.pth"
    torch.manual_seed(0)
    model, (mean, std) = create_model(
        TrainConfig(from_scratch=True, vit_size=args.vit_size, image_size=args.image_size), list(MASTER_CATEGORIES)
    )
    h, w = (int(v) for v in args.source_size.split("x"))
    save_checkpoint(str(model_path), model, Preprocessing(args.image_size, (h, w), mean, std), {}, {})
    del model

    forward, plain, ceiling, ours = [], [], [], []
    for run in range(args.runs):
        forward.append(plain_forward(paths, model_path, args.batch_size))
        if args.ceiling:
            plain.append(plain_loop(paths, model_path, args.batch_size))
            ceiling.append(plain_ceiling(paths, model_path, args.batch_size))
        ours.append(job(folder, model_path, args.work / "pred.csv", args.batch_size, args.repo.resolve()))
        print(f"run {run + 1}: forward {forward[-1]:.1f}, loop {plain[-1] if plain else 0:.1f}, "
              f"ceiling {ceiling[-1] if ceiling else 0:.1f} img/s; job {json.dumps(ours[-1])}", flush=True)  # fmt: skip

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    n = ours[0]["predicted"] + ours[0]["failed"]
    print(f"machine: {device}, torch {torch.__version__}, ViT-{args.vit_size} at {args.image_size} from {h}x{w}, "
          f"{n} files ({'tree' if args.tree else 'flat'}), batch {args.batch_size}, job from {args.repo}")  # fmt: skip
    rate = statistics.median(r["rate"] for r in ours)
    print(f"median plain forward: {statistics.median(forward):.1f} img/s")
    if plain:
        print(f"median plain loop ({len(paths)} files): {statistics.median(plain):.1f} img/s")
        print(f"median plain ceiling ({len(paths)} files, decode pool + model): {statistics.median(ceiling):.1f} img/s")
    print(f"job wall: {statistics.median(r['wall_s'] for r in ours):.1f} s, {rate:.1f} img/s whole process")
    if "steady_rate" in ours[0]:
        print(
            f"job steady rate (first prediction to last): {statistics.median(r['steady_rate'] for r in ours):.1f} img/s"
        )
    if "first_prediction_s" in ours[0]["timings"]:
        print(
            f"job start to first prediction: {statistics.median(r['timings']['first_prediction_s'] for r in ours):.1f} s"
        )
    print(f"job driver peak RSS: {statistics.median(r['driver_peak_rss_mb'] for r in ours):.0f} MB")
    print(f"job timings: {ours[0]['timings']}")
    print(f"ratio (job / plain forward): {rate / statistics.median(forward):.3f}")
    if ceiling:
        print(f"ratio (job / plain ceiling): {rate / statistics.median(ceiling):.3f}")


if __name__ == "__main__":
    main()
