"""Training throughput: the project's training step, fed by its own data path, against a
plain PyTorch loop over the same model, batch and device, measured in one run.

    python bench/train_throughput.py --vit-size tiny --image-size 32 --rows 8000
    python bench/train_throughput.py --vit-size base --image-size 224 --batch-size 128 --rows 20000   # a GPU

The project: `fashion_vit.tune.run` (jobs/tune.py's whole path: Ray Tune, a Ray Train
TorchTrainer, Ray Data shards of decoded uint8 images, device-side resize/flip/normalise,
AdamW, bf16 autocast on GPUs). Its rate is each epoch's training images over the
epoch's training seconds as the worker measured them (validation excluded); the first
epoch (compilation, caches) is dropped and the median of the rest kept.

The plain loop: the same model, optimizer, gradient clipping, batch size and precision, with the same real
images already decoded, resized and normalised on the device, so each step is only
forward, backward and optimizer: the arithmetic ceiling. Median of --repeats passes.

Prints both rates and their ratio last. Needs ../shared/data/fashion-small (or --data).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fashion_vit import tune  # noqa: E402
from fashion_vit.config import MASTER_CATEGORIES, TrainConfig  # noqa: E402
from fashion_vit.data import infer_source_size, load_data  # noqa: E402
from fashion_vit.model import create_model  # noqa: E402
from fashion_vit.transforms import Preprocessing, decode_image, image_bytes, preprocess  # noqa: E402


def plain_loop(cfg: TrainConfig, images, repeats: int, steps: int) -> list[float]:
    """Images/s of forward + backward + AdamW on device-resident, preprocessed batches."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu is not False else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    model, (mean, std) = create_model(cfg, list(MASTER_CATEGORIES))
    model.to(device).train()
    source = infer_source_size(images, cfg.image_size)
    prep = Preprocessing(cfg.image_size, source, tuple(mean), tuple(std))
    raw = torch.from_numpy(np.stack([decode_image(image_bytes(b), source) for b in images.iloc[: cfg.batch_size * 8]]))
    batches = [preprocess(raw[i : i + cfg.batch_size].to(device), prep) for i in range(0, len(raw), cfg.batch_size)]
    labels = torch.randint(0, len(MASTER_CATEGORIES), (cfg.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_bf16 = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def step(x):
        with autocast():
            logits = model(pixel_values=x).logits
        loss = F.cross_entropy(logits.float(), labels[: len(x)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:  # the project clips too: the same arithmetic
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()

    for i in range(3):  # warm-up: allocator, kernels, threads
        step(batches[i % len(batches)])
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
        rates.append(steps * cfg.batch_size / (time.perf_counter() - t0))
    return rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--rows", type=int, default=8000, help="stratified sample the project trains on (80%% is training)")
    p.add_argument("--vit-size", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="project epochs; the first is dropped as warm-up")
    p.add_argument("--repeats", type=int, default=3, help="plain-loop passes of one epoch's steps each")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "train-throughput")
    args = p.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    cfg = TrainConfig(
        data_dir=str(args.data),
        limit=args.rows,
        from_scratch=True,
        vit_size=args.vit_size,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=1e-3,
        bf16=args.bf16,
        output_dir=str(args.work),
        recipe="scratch",
    ).validate()

    t0 = time.perf_counter()
    outcome = tune.run(cfg, log=lambda *_: None)
    wall = time.perf_counter() - t0
    history = outcome.trials[0]["history"]
    ours = [row["images_per_second"] for row in history[1:]] or [history[0]["images_per_second"]]

    import ray

    ray.shutdown()  # the plain loop gets the machine to itself
    data = load_data(cfg)
    train_images = round(len(data.frame) * (1 - cfg.val_fraction - cfg.test_fraction))
    steps = max(10, train_images // args.batch_size)
    plain = plain_loop(cfg, data.frame["image"], args.repeats, steps)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(
        f"machine: {device}, torch {torch.__version__}; ViT-{args.vit_size} at {args.image_size}, batch {args.batch_size}, "
        f"bf16 {args.bf16 and torch.cuda.is_available()}"
    )
    print("project epochs (img/s): " + ", ".join(f"{row['images_per_second']:.1f}" for row in history))
    print("plain passes (img/s): " + ", ".join(f"{r:.1f}" for r in plain))
    print(
        "project time: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in outcome.timings.items())
        + f"; whole run {wall:.1f}s"
    )
    print(f"median plain training step: {statistics.median(plain):.1f} img/s")
    print(f"median project training (epochs 2+): {statistics.median(ours):.1f} img/s")
    print(f"ratio (project / plain): {statistics.median(ours) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    main()
