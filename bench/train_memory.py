"""Driver memory while training on large images: does the driver's peak RSS grow with
the dataset's bytes?

    python bench/train_memory.py --images 50000 --size 600x800
    python bench/train_memory.py --images 50000 --size 600x800 --repo /path/to/older/checkout   # before

Builds (once, cached under --work) a Kaggle-layout folder of --images JPEGs at --size
(width x height), made from the real thumbnails of ../shared/data/fashion-small scaled
up (labels kept; ids past the real ones reuse their images), then runs jobs/tune.py's
library path (`tune.run`, the scratch recipe, --epochs 1) in a process of its own and
reports that process's peak RSS (the driver; Ray's workers are other processes), the
folder's size and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import json, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from jobs import tune as job
from fashion_vit import tune
cfg = job.parse_args(sys.argv[2:]).validate()
outcome = tune.run(cfg, log=lambda *a: None)
print("BENCH " + json.dumps({"wall_s": time.perf_counter() - t0, "timings": outcome.timings,
                             "test_accuracy": outcome.best["test"]["accuracy"],
                             "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _enlarge(args) -> None:
    from PIL import Image

    src, dest, size = args
    if not os.path.exists(dest):
        with Image.open(src) as img:
            img.convert("RGB").resize(size, Image.BICUBIC).save(dest, quality=90)


def build(data: Path, n: int, size: tuple[int, int], dest: Path) -> Path:
    done = dest / ".complete"
    if done.exists() and done.read_text() == f"{n} {size}":
        return dest
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with open(data / "styles.csv", newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), [r for r in reader if r[2] != "Home"]
    out_rows, jobs = [], []
    for i in range(n):
        row = list(rows[i % len(rows)])
        src = data / "images" / f"{row[0]}.jpg"
        row[0] = str(int(row[0]) + 1_000_000 * (i // len(rows)))
        out_rows.append(row)
        jobs.append((str(src), str(dest / "images" / f"{row[0]}.jpg"), size))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_enlarge, jobs, chunksize=256))
    with open(dest / "styles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(out_rows)
    done.write_text(f"{n} {size}")
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--size", default="600x800", help="width x height of the made images")
    p.add_argument("--repo", type=Path, default=ROOT, help="run the training of this checkout (a before/after)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()

    w, h = (int(v) for v in args.size.split("x"))
    folder = build(args.data, args.images, (w, h), args.work / f"big-{args.images}-{w}x{h}")
    size_gb = sum(f.stat().st_size for f in (folder / "images").iterdir()) / 1e9
    out = args.work / "train-memory"
    flags = ["--data-dir", str(folder), "--from-scratch", "--epochs", "1", "--output-dir", str(out),
             "--name", f"train-memory-{int(time.time())}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(args.repo.resolve()), *flags], cwd=args.repo,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("BENCH "))[6:])
    print(f"{args.images} images at {w}x{h} ({size_gb:.2f} GB) from {args.repo}")
    print(f"driver peak RSS: {report['driver_peak_rss_mb']:.0f} MB; wall {report['wall_s']:.0f} s; "
          f"test accuracy {report['test_accuracy']:.3f}")  # fmt: skip
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items()))


if __name__ == "__main__":
    main()
