"""Batch inference throughput: jobs/batch_predict.py end to end against a plain
PyTorch loop over the same files and the same model, measured in one run.

    python bench/predict_throughput.py --images 20000 --vit-size tiny --image-size 224

Two plain references, both in one process on all cores (or the GPU):
- the plain loop reads, decodes (the project's decode_image), preprocesses (the
  project's preprocess) and runs the model in batches: the ceiling for one machine
  doing the whole job;
- the plain forward runs the model alone over batches already decoded, resized and
  normalised on the device (bf16 autocast on a GPU, as the job): the arithmetic ceiling.
The job is timed as a whole process (Ray start, listing, CSV included). Prints the
rates and the ratios, job / plain loop last. Needs ../shared/data/fashion-small (or --data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fashion_vit.config import MASTER_CATEGORIES, TrainConfig  # noqa: E402
from fashion_vit.model import create_model, load_checkpoint, save_checkpoint  # noqa: E402
from fashion_vit.transforms import Preprocessing, decode_image, preprocess  # noqa: E402


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


def plain_loop(folder: Path, model_path: Path, batch_size: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    model, prep = load_checkpoint(str(model_path)).build()
    paths = sorted(str(p) for p in folder.iterdir())
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            x = torch.from_numpy(np.stack([decode_image(Path(p).read_bytes(), prep.source_size) for p in chunk]))
            model(pixel_values=preprocess(x, prep)).logits.softmax(1).max(1)
    return len(paths) / (time.perf_counter() - t0)


def plain_forward(folder: Path, model_path: Path, batch_size: int, steps: int = 20) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    model, prep = load_checkpoint(str(model_path)).build()
    model.to(device)
    paths = sorted(str(p) for p in folder.iterdir())[: batch_size * 4]
    raw = torch.from_numpy(np.stack([decode_image(Path(p).read_bytes(), prep.source_size) for p in paths]))
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


def job(folder: Path, model_path: Path, out: Path, batch_size: int) -> float:
    n = sum(1 for _ in folder.iterdir())
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "batch_predict.py"),
            "--input",
            str(folder),
            "--model",
            str(model_path),
            "--output",
            str(out),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--vit-size", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=1, help="paired runs; medians reported")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()

    folder = make_folder(args.data, args.images, args.work / f"images-{args.images}")
    model_path = args.work / f"vit-{args.vit_size}-{args.image_size}.pth"
    torch.manual_seed(0)
    model, (mean, std) = create_model(
        TrainConfig(from_scratch=True, vit_size=args.vit_size, image_size=args.image_size), list(MASTER_CATEGORIES)
    )
    save_checkpoint(str(model_path), model, Preprocessing(args.image_size, (80, 60), mean, std), {}, {})

    plain, forward, ours = [], [], []
    for run in range(args.runs):
        forward.append(plain_forward(folder, model_path, args.batch_size))
        plain.append(plain_loop(folder, model_path, args.batch_size))
        ours.append(job(folder, model_path, args.work / "pred.csv", args.batch_size))
        print(
            f"run {run + 1}: plain forward {forward[-1]:.1f} img/s, plain loop {plain[-1]:.1f} img/s, "
            f"jobs/batch_predict.py {ours[-1]:.1f} img/s",
            flush=True,
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(
        f"machine: {device}, torch {torch.__version__}, ViT-{args.vit_size} at {args.image_size}, {args.images} images, batch {args.batch_size}"
    )
    print(f"median plain forward: {statistics.median(forward):.1f} img/s")
    print(f"median plain loop: {statistics.median(plain):.1f} img/s")
    print(f"median jobs/batch_predict.py: {statistics.median(ours):.1f} img/s")
    print(f"ratio (job / plain forward): {statistics.median(ours) / statistics.median(forward):.3f}")
    print(f"ratio (job / plain): {statistics.median(ours) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    main()
