"""What pretraining buys: the same data and split, with and without pretrained weights.

    python bench/pretraining.py                                  # the four runs below
    python bench/pretraining.py --runs pretrained-cpu scratch    # some of them
    python bench/pretraining.py --runs pretrained-cpu -- --epochs 3 --lr 2e-4   # a recipe candidate

The runs (each `python jobs/tune.py` in a process of its own, so that its minutes are
the whole job as a user meets it: Ray's start, loading, decoding, training, the test):
- scratch: the scratch recipe (--from-scratch) on all of --data-dir;
- pretrained-cpu: the pretrained-cpu recipe from --model on all of it;
- seed-4000: the seed's exact recipe (224 px, 3 epochs, lr 2e-5) from --model on a
  stratified 4,000-image sample (all of it takes hours on 2 CPU cores);
- scratch-4000: the scratch recipe on the same sample.

The split is seeded and stratified, so runs on the same rows share it. Each run has its
own folder under --work; a folder that already holds a summary.json is read, not rerun.
Everything after `--` is added to every run's flags. Prints a markdown table: minutes,
validation and test accuracy, test macro-F1 with its bootstrap 95 % interval, macro-F1
over the common classes, and per-class F1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

RUNS = {
    "scratch": ["--from-scratch"],
    "pretrained-cpu": ["--recipe", "pretrained-cpu", "--model", "{model}"],
    "seed-4000": ["--model", "{model}", "--limit", "4000"],
    "scratch-4000": ["--from-scratch", "--limit", "4000"],
}


def run_one(name: str, args, extra: list[str]) -> tuple[dict, float | None, list[str]]:
    """(summary.json, the job's wall seconds or None if read back, the flags) of one run."""
    out = args.work / name
    flags = ["--data-dir", str(args.data_dir), *(f.format(model=args.model) for f in RUNS[name]), *extra]
    summary = out / "summary.json"
    if summary.is_file():
        print(f"{name}: reading {summary} (delete it to rerun)", flush=True)
        return json.loads(summary.read_text()), None, flags
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), *flags, "--output-dir", str(out)]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "job.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}): see {out / 'job.log'}")
    (out / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    return json.loads(summary.read_text()), wall, flags


def row(name: str, summary: dict, wall: float | None, out: Path) -> str:
    if wall is None and (out / "wall_seconds.txt").is_file():
        wall = float((out / "wall_seconds.txt").read_text())
    test, val = summary["best"]["test"], summary["best"]["val"]
    lo, hi = test["macro_f1_ci95"]
    per_class = " | ".join(f"{test['per_class'][c]['f1']:.3f}" for c in test["labels"])
    minutes = f"{wall / 60:.1f}" if wall else "?"
    epochs = summary["best"]["config"].get("image_size"), summary["train_config"]["epochs"]
    return (
        f"| {name} | {summary['data']['split_sizes']['train']} | {epochs[0]} px, {epochs[1]} ep | {minutes} "
        f"| {val['val_accuracy']:.4f} | {test['accuracy']:.4f} | {test['macro_f1']:.3f} ({lo:.3f}-{hi:.3f}) "
        f"| {test['macro_f1_common']:.3f} | {per_class} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=SHARED / "data" / "fashion-small")
    p.add_argument("--model", type=Path, default=SHARED / "models" / "vit-tiny-patch16-224-augreg")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "pretraining")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags added to every run")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    results = [(name, *run_one(name, args, extra)) for name in args.runs]
    labels = results[0][1]["best"]["test"]["labels"]
    print(f"\nmachine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}\n")
    for name, _, _, flags in results:
        print(f"- {name}: python jobs/tune.py {' '.join(flags)}")
    print("\n| run | train images | input, epochs | minutes | val acc | test acc | test macro-F1 (95 % CI) "
          "| macro-F1, common classes | " + " | ".join(f"F1 {c}" for c in labels) + " |")  # fmt: skip
    print("|" + "---|" * (8 + len(labels)))
    for name, summary, wall, _ in results:
        print(row(name, summary, wall, args.work / name))


if __name__ == "__main__":
    main()
