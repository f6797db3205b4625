"""Resolution as a speed/accuracy dial: the same training run at several input sizes.

    python bench/resolution.py --sizes 224 160 112 80 -- --data-dir ../shared/data/fashion-small --from-scratch --limit 4000 --epochs 3

Everything after `--` is jobs/tune.py's own flags; each size runs them with only
--image-size changed (same data, split, epochs and seed: the same training budget).
Prints a markdown table: validation and test accuracy, test macro-F1, the training rate
(median over epochs after the first) and the job's wall time. Run one size at a time
per machine: the rates are only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fashion_vit import tune  # noqa: E402
from jobs.tune import parse_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 112, 80])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "resolution")
    p.add_argument("tune_flags", nargs=argparse.REMAINDER, help="-- then jobs/tune.py flags")
    args = p.parse_args()
    flags = args.tune_flags[1:] if args.tune_flags[:1] == ["--"] else args.tune_flags
    base = parse_args(flags)

    rows = []
    for size in args.sizes:
        cfg = replace(
            base,
            image_size=size,
            output_dir=str(args.work / f"size-{size}"),
            name=f"resolution-{size}-{int(time.time())}",
        ).validate()
        t0 = time.perf_counter()
        outcome = tune.run(cfg, log=lambda *_: None)
        wall = time.perf_counter() - t0
        history = outcome.trials[0]["history"]
        rate = statistics.median(r["images_per_second"] for r in (history[1:] or history))
        test = outcome.best["test"]
        rows.append(
            (
                size,
                outcome.best["val"]["val_accuracy"],
                test["accuracy"],
                test["macro_f1"],
                rate,
                sum(r["epoch_seconds"] for r in history),
                wall,
            )
        )
        print(
            f"size {size}: val {rows[-1][1]:.4f} test {rows[-1][2]:.4f} macro-F1 {rows[-1][3]:.4f} {rate:.1f} img/s, {wall:.0f}s",
            flush=True,
        )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(f"\nmachine: {device}; jobs/tune.py {' '.join(flags)}\n")
    print("| input size | patches | val accuracy | test accuracy | test macro-F1 | train img/s | epochs s | job s |")
    print("|---|---|---|---|---|---|---|---|")
    for size, val, acc, f1, rate, epochs_s, wall in rows:
        print(
            f"| {size} | {(size // 16) ** 2} | {val:.4f} | {acc:.4f} | {f1:.4f} | {rate:.1f} | {epochs_s:.0f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
