"""A speed/accuracy dial: the same training run at several values of one flag.

    python bench/dial.py --flag image-size --values 224 160 112 80 48 32 -- --data-dir ../shared/data/fashion-small --from-scratch --limit 4000 --epochs 3
    python bench/dial.py --flag patch-size --values 16 8 4 -- --data-dir ../shared/data/fashion-small --from-scratch --limit 4000 --epochs 3

Everything after `--` is jobs/tune.py's own flags; each value runs them with only
--FLAG changed (same data, split, epochs and seed: the same training budget). Prints a
markdown table: validation and test accuracy, test macro-F1 (with its bootstrap 95%
interval), the training rate (median over epochs after the first) and the job's wall
time. Run one value at a time per machine: the rates are only comparable within one run
of this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fashion_vit import tune  # noqa: E402
from jobs.tune import parse_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flag", default="image-size", help="the jobs/tune.py flag to turn (without --)")
    p.add_argument("--values", nargs="+", default=["224", "160", "112", "80"])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "dial")
    p.add_argument("tune_flags", nargs=argparse.REMAINDER, help="-- then jobs/tune.py flags")
    args = p.parse_args()
    flags = args.tune_flags[1:] if args.tune_flags[:1] == ["--"] else args.tune_flags

    rows = []
    for value in args.values:
        name = f"dial-{args.flag}-{value}-{int(time.time())}"
        cfg = parse_args([*flags, f"--{args.flag}", value, "--output-dir", str(args.work / name), "--name", name])
        t0 = time.perf_counter()
        outcome = tune.run(cfg.validate(), log=lambda *_: None)
        wall = time.perf_counter() - t0
        history = outcome.trials[0]["history"]
        rate = statistics.median(r["images_per_second"] for r in (history[1:] or history))
        test = outcome.best["test"]
        lo, hi = test.get("macro_f1_ci95", (float("nan"), float("nan")))
        epochs_s = sum(r["epoch_seconds"] for r in history)
        rows.append((value, cfg.image_size, cfg.patch_size, outcome.best["val"]["val_accuracy"], test["accuracy"],
                     test["macro_f1"], lo, hi, rate, epochs_s, wall))  # fmt: skip
        print(f"--{args.flag} {value}: val {rows[-1][3]:.4f} test {rows[-1][4]:.4f} macro-F1 {rows[-1][5]:.4f} "
              f"({lo:.3f}-{hi:.3f}) {rate:.1f} img/s, {wall:.0f}s", flush=True)  # fmt: skip

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(f"\nmachine: {device}; jobs/tune.py {' '.join(flags)}\n")
    print(
        f"| --{args.flag} | tokens | val accuracy | test accuracy | test macro-F1 (95% CI) | train img/s | epochs s | job s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for value, size, patch, val, acc, f1, lo, hi, rate, epochs_s, wall in rows:
        tokens = (size // patch) ** 2
        print(
            f"| {value} | {tokens} | {val:.4f} | {acc:.4f} | {f1:.4f} ({lo:.3f}-{hi:.3f}) | {rate:.1f} | {epochs_s:.0f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
