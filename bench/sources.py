"""Each training source on data no test fixture uses, then batch prediction from a table.

    python bench/sources.py --data ../shared/data/fashion-small --work /tmp/sources --rows 1500 --epochs 4

Builds, from a Kaggle-layout folder (images linked, not copied), five disjoint sets of
--rows images of the four common masterCategory classes, leaving out every image the
test fixtures pick: class folders (with a README and a .DS_Store); a Parquet label
table with relative paths, a missing file and a duplicate; a CSV of file:// URIs; a
Hugging Face dataset folder (image bytes, ClassLabel, no id); and a product export to
label (keys with leading zeros, a path listed twice, a missing file). Then runs
jobs/tune.py on each source, jobs/evaluate.py of the class-folder model on the label
table, and jobs/batch_predict.py over the export, and checks that the output joins
back to the export on its key with no row missing or doubled. Prints each command and
a markdown table: test accuracy against the majority class's share of the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Apparel", "Accessories", "Footwear", "Personal Care")


def fixture_ids(rows: list[list[str]], names: list[str]) -> set[str]:
    """Ids of the images tests/conftest.py, test_sources.py, test_batch_scale.py and
    test_data.py pick (the same seeds and slices)."""
    used = set()
    kept = [r for r in rows if r[2] != "Home"]
    random.Random(1234).shuffle(kept)
    used |= {r[0] for r in kept[:1800]}
    rng = random.Random(21)
    for name in ("Accessories", "Apparel", "Footwear"):
        used |= set(rng.sample(sorted(r[0] for r in rows if r[2] == name), 90))
    used |= {n.split(".")[0] for n in names[:3760]}
    by_class: dict[str, list[list[str]]] = {}
    for r in rows:
        by_class.setdefault(r[2], []).append(r)
    return used | {r[0] for c in by_class.values() for r in c[:12]}


def build(data: Path, work: Path, n: int) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(data / "styles.csv", newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    names = sorted(os.listdir(data / "images"))
    used, have = fixture_ids(rows, names), {n.split(".")[0] for n in names}
    free = [r for r in rows if len(r) >= 10 and r[0] in have and r[0] not in used and r[2] in CLASSES]
    random.Random(2026).shuffle(free)
    sets = {k: free[i * n : (i + 1) * n] for i, k in enumerate(["folders", "table", "uris", "hub", "export"])}
    image = lambda r: data.resolve() / "images" / f"{r[0]}.jpg"

    for r in sets["folders"]:  # class folders, Apparel one level deeper
        folder = work / "photos" / r[2] / (r[3] if r[2] == "Apparel" else "")
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(image(r), folder / f"{r[0]}.jpg")
    (work / "photos" / "README.txt").write_text("catalogue photos")
    (work / "photos" / "Apparel" / ".DS_Store").write_text("x")

    (work / "catalogue" / "img").mkdir(parents=True)
    for r in sets["table"]:
        os.symlink(image(r), work / "catalogue" / "img" / f"{r[0]}.jpg")
    t = [(int(r[0]), f"img/{r[0]}.jpg", r[2]) for r in sets["table"]]
    t += [(1, "img/404.jpg", "Apparel"), t[0]]
    columns = {"product_id": [x[0] for x in t], "file": [x[1] for x in t], "category": [x[2] for x in t]}
    pq.write_table(pa.table(columns), work / "catalogue" / "labels.parquet")

    with open(work / "uris.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "uri", "masterCategory"])
        w.writerows([f"{i:06d}", image(r).as_uri(), r[2]] for i, r in enumerate(sets["uris"]))

    features = datasets.Features({"img": datasets.Image(), "cls": datasets.ClassLabel(names=sorted(CLASSES))})
    hub = {
        "img": [{"bytes": image(r).read_bytes(), "path": None} for r in sets["hub"]],
        "cls": [r[2] for r in sets["hub"]],
    }
    (work / "hub").mkdir()
    datasets.Dataset.from_dict(hub, features=features).to_parquet(str(work / "hub" / "train.parquet"))

    with open(work / "export.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "product_id", "image", "truth"])
        w.writerows([f"{i:07d}", r[0], str(image(r)), r[2]] for i, r in enumerate(sets["export"]))
        first = sets["export"][0]
        w.writerow(["9999998", first[0], str(image(first)), first[2]])
        w.writerow(["9999999", "0", str(work / "missing.jpg"), ""])


def run(script: str, *args: str) -> None:
    command = [sys.executable, script, *args]
    print("$ python " + " ".join(command[1:]), flush=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-8:]
    print("\n".join(tail) + (f"\n{proc.stderr[-2000:]}" if proc.returncode else "") + "\n", flush=True)
    if proc.returncode:
        sys.exit(proc.returncode)


def check_join(work: Path) -> str:
    import pandas as pd

    src = pd.read_csv(work / "export.csv", dtype=str, keep_default_na=False)
    out = pd.read_csv(work / "pred.csv", dtype=str, keep_default_na=False)
    joined = src.merge(out, on="sku", how="outer", indicator=True, suffixes=("", "_out"))
    scored = joined[(joined["error"] == "") & (joined["truth"] != "")]
    accuracy = (scored["predicted_category"] == scored["truth"]).mean()
    majority = scored["truth"].value_counts(normalize=True).iloc[0]
    return (
        f"export rows {len(src)}, output rows {len(out)}, keys in the same order: {list(out['sku']) == list(src['sku'])}, "
        f"join {joined['_merge'].value_counts().to_dict()}, errors {int((out['error'] != '').sum())}; "
        f"accuracy {accuracy:.4f} vs majority {majority:.4f} on {len(scored)} rows"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "sources")
    p.add_argument("--rows", type=int, default=1500, help="images per set")
    p.add_argument("--epochs", default="4")
    args = p.parse_args()
    work = args.work.resolve()
    if work.exists():
        sys.exit(f"{work} exists: give a new --work")
    build(args.data, work, args.rows)
    epochs = ["--from-scratch", "--epochs", args.epochs]
    sources = {
        "class folders": ["--data-dir", str(work / "photos")],
        "label table (Parquet, relative paths)": ["--labels", str(work / "catalogue" / "labels.parquet"),
                                                  "--image-column", "file", "--label-column", "category"],
        "label table (CSV, file:// URIs)": ["--labels", (work / "uris.csv").as_uri(), "--image-column", "uri"],
        "hub dataset (no id, ClassLabel)": ["--dataset", str(work / "hub"), "--image-column", "img",
                                            "--label-column", "cls"],
    }  # fmt: skip
    table = []
    for i, (name, flags) in enumerate(sources.items()):
        out = work / f"results-{i}"
        run("jobs/tune.py", *flags, *epochs, "--output-dir", str(out))
        s = json.loads((out / "summary.json").read_text())
        counts = s["data"]["class_counts"]["test"]
        sizes = "/".join(str(v) for v in s["data"]["split_sizes"].values())
        table.append(f"| {name} | {sizes} | {s['best']['test']['accuracy']:.4f} | {max(counts) / sum(counts):.4f} |")
    model = str(work / "results-0" / "vit_model.pth")
    run("jobs/evaluate.py", "--model", model, *sources["label table (Parquet, relative paths)"],
        "--output", str(work / "report"))  # fmt: skip
    run("jobs/batch_predict.py", "--input-table", str(work / "export.csv"), "--path-column", "image",
        "--keep-columns", "sku,product_id", "--model", model, "--output", str(work / "pred.csv"))  # fmt: skip
    print("| source | train/val/test | test accuracy | majority share |\n|---|---|---|---|\n" + "\n".join(table))
    print("\nbatch from a table: " + check_join(work))


if __name__ == "__main__":
    main()
