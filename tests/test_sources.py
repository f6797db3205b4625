"""Training and prediction from the layouts users keep: class folders, label tables (CSV
or Parquet, relative paths or URIs), any Hugging Face dataset, and batch prediction from
a table with its keys carried through. Real images from ../shared."""

from __future__ import annotations

import csv
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fashion_vit.config import TrainConfig
from fashion_vit.data import DataError, load_data
from fashion_vit.transforms import image_bytes

CLASSES = ("Accessories", "Apparel", "Footwear")  # the folder names, sorted: the label set
PER_CLASS = 30


@pytest.fixture(scope="module")
def picked(styles_rows):
    """Disjoint seeded picks of real rows per class: (id, masterCategory) pairs."""
    _, rows = styles_rows
    rng = random.Random(21)
    out = {}
    for name in CLASSES:
        ids = sorted(r[0] for r in rows if r[2] == name)
        out[name] = rng.sample(ids, 3 * PER_CLASS)
    return out


def link(src_dir, image_id, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src_dir / f"{image_id}.jpg", dest)


@pytest.fixture(scope="module")
def class_folders(picked, shared_data, tmp_path_factory):
    """photos/<label>/**/<id>.jpg at several depths, with what a real folder also holds."""
    root = tmp_path_factory.mktemp("sources") / "photos"
    for name in CLASSES:
        for i, image_id in enumerate(picked[name][:PER_CLASS]):
            sub = {"Apparel": f"shelf{i % 3}", "Footwear": "", "Accessories": f"a/b{i % 2}"}[name]
            link(shared_data / "images", image_id, root / name / sub / f"{image_id}.jpg")
    (root / "README.txt").write_text("not in a class folder")
    (root / "Apparel" / "notes.txt").write_text("not an image")
    (root / "Footwear" / "gone.jpg").symlink_to(root / "deleted.jpg")  # a link whose file was removed
    link(shared_data / "images", picked["Apparel"][-1], root / ".thumbs" / "x.jpg")
    for image_id in picked["Footwear"][-2:]:  # a class of two: too small to split
        link(shared_data / "images", image_id, root / "Sandals" / f"{image_id}.jpg")
    return root


def write_label_table(folder, picked, shared_data):
    """labels.parquet beside img/: relative paths, an int key, and one row of each kind
    that cannot train."""
    rows = []
    for name in CLASSES:
        for image_id in picked[name][PER_CLASS : 2 * PER_CLASS]:
            link(shared_data / "images", image_id, folder / "img" / f"{image_id}.jpg")
            rows.append((int(image_id), f"img/{image_id}.jpg", name))
    first, second = rows[0], rows[1]
    rows += [
        (1, "img/404.jpg", "Apparel"),  # image file missing
        (2, None, "Apparel"),  # no image reference
        (3, rows[2][1], ""),  # no label (its image is also listed with one: kept once)
        first,  # the same image and label twice: kept once
        (4, second[1], "Footwear" if second[2] != "Footwear" else "Apparel"),  # two labels: both dropped
    ]
    table = pa.table({
        "product_id": pa.array([r[0] for r in rows], pa.int64()),
        "file": [r[1] for r in rows],
        "category": [r[2] for r in rows],
    })  # fmt: skip
    pq.write_table(table, folder / "labels.parquet")
    return folder / "labels.parquet", rows


@pytest.fixture(scope="module")
def label_table(picked, shared_data, tmp_path_factory):
    return write_label_table(tmp_path_factory.mktemp("sources") / "catalogue", picked, shared_data)


# --- readers, without Ray -------------------------------------------------------------------


def test_class_folders_take_labels_from_folder_names_and_count_what_they_skip(class_folders):
    data = load_data(TrainConfig(data_dir=str(class_folders)))
    assert data.labels == list(CLASSES) and data.source == f"class folders {class_folders}"
    assert len(data.frame) == 3 * PER_CLASS
    assert data.dropped["not in a class folder"] == 1
    assert data.dropped["not an image file (by its extension)"] == 1
    assert data.dropped["hidden file or folder"] == 1
    assert data.dropped["image file missing"] == 1  # counted, not read: reading it would end the run
    assert data.dropped["class too small to split (Sandals)"] == 2 and data.small_classes == {"Sandals": 2}
    assert "Sandals (2)" in data.summary() and "add images" in data.summary()
    # The key is the path below DIR (the split sorts by it); Ray tasks read the absolute path.
    row = data.frame.iloc[0]
    assert row["image"] == str(class_folders / row["id"]) and row["id"].split("/")[0] == data.labels[row["label"]]
    assert list(data.frame["id"]) == sorted(data.frame["id"])
    assert any(i.count("/") == 3 for i in data.frame["id"])  # Accessories/a/b0/<id>.jpg: any depth


def test_a_parquet_label_table_with_relative_paths(label_table):
    path, rows = label_table
    data = load_data(TrainConfig(labels_table=str(path), image_column="file", label_column="category"))
    assert data.labels == list(CLASSES)
    assert data.dropped == {
        "no image reference": 1,
        "image file missing": 1,
        "duplicate image (kept once)": 2,
        "image listed with different labels": 2,
        "no label": 0,
    }
    assert len(data.frame) == 3 * PER_CLASS - 1  # the image listed with two labels is out
    assert len(data.frame) + sum(data.dropped.values()) == len(rows)
    assert all(p.startswith(str(path.parent / "img") + "/") for p in data.frame["image"])
    assert all(image_bytes(p)[:2] == b"\xff\xd8" for p in data.frame["image"][:5])


def test_a_csv_label_table_of_file_uris(picked, shared_data, tmp_path):
    ids = {name: picked[name][2 * PER_CLASS : 2 * PER_CLASS + 5] for name in CLASSES}
    table = tmp_path / "uris.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "masterCategory", "note"])
        for name, chosen in ids.items():
            w.writerows([f"file://{shared_data}/images/{i}.jpg", name, "x"] for i in chosen)
        w.writerow([f"file://{tmp_path}/gone.jpg", "Apparel", "missing"])
    data = load_data(TrainConfig(labels_table=f"file://{table}", image_column="uri"))
    # The masterCategory column keeps the mission's six labels, whatever the source.
    assert len(data.labels) == 6 and data.dropped["image file missing"] == 1 and len(data.frame) == 15
    assert all(u.startswith("file:///") for u in data.frame["image"])
    assert image_bytes(data.frame["image"][0])[:2] == b"\xff\xd8"  # what a Ray task reads


def test_any_hub_dataset_without_an_id_column(picked, shared_data, tmp_path):
    """A dataset with an Image column and ClassLabel labels (stored as class ids), and no
    `id`, read through datasets.load_dataset the way a hub id is (here a local copy)."""
    import datasets

    ids = [i for name in CLASSES for i in picked[name][:6]]
    names = [name for name in CLASSES for _ in range(6)]
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict(
        {
            "picture": [{"bytes": (shared_data / "images" / f"{i}.jpg").read_bytes(), "path": None} for i in ids],
            "kind": names,
        },
        features=features,
    )
    (tmp_path / "hub").mkdir()
    ds.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    cfg = TrainConfig(dataset=str(tmp_path / "hub"), image_column="picture", label_column="kind")
    data = load_data(cfg)
    assert data.labels == list(CLASSES) and len(data.frame) == 18
    assert sorted(data.frame["id"]) == list(range(18))  # no id column: the row number is the key
    assert isinstance(data.frame["image"][0], bytes) and data.frame["image"][0][:2] == b"\xff\xd8"
    with pytest.raises(
        DataError, match=r"--label-column 'masterCategory' is not a column of .*\(columns: picture, kind\)"
    ):
        load_data(TrainConfig(dataset=str(tmp_path / "hub"), image_column="picture"))


# --- refusals: one line each ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("refusals")
    (folder / "t.csv").write_text("sku,file,category\n1,x.jpg,Apparel\n")
    (folder / "t.xlsx").write_text("x")
    (folder / "web.csv").write_text("file,category\nx.jpg,Apparel\nhttps://example.com/a.jpg,Apparel\n")
    (folder / "empty").mkdir()
    return folder


def refusal_cases(folder, label_table, model):
    table = str(label_table[0])
    t = str(folder / "t.csv")
    tune = "tune"
    evaluate = "evaluate"
    predict = "batch_predict"
    return [
        (tune, ["--data-dir", str(folder / "empty")], 2, "has neither styles.csv"),
        (tune, ["--data-dir", str(folder), "--labels", t], 2, "give one of --data-dir, --labels or --dataset"),
        (tune, ["--labels", t, "--label-column", "category"], 2,
         f"--image-column 'image' is not a column of {t} (columns: sku, file, category)"),
        (tune, ["--labels", str(folder / "t.xlsx")], 2, "give a .csv, .parquet or a folder of .parquet files"),
        (tune, ["--labels", "file://" + table, "--image-column", "file", "--from-scratch"], 1,
         "--label-column 'masterCategory' is not a column of file://"),
        (tune, ["--labels", str(folder / "web.csv"), "--image-column", "file", "--label-column", "category"], 1,
         "cannot read 'https://example.com/a.jpg': https:// is not a storage this reads"),
        (evaluate, ["--model", model, "--labels", t, "--dataset", "x/y"], 2, "give one of --data-dir, --labels"),
        (predict, ["--input-table", t, "--model", model], 2,
         f"--path-column 'path' is not a column of {t} (columns: sku, file, category)"),
        (predict, ["--input-table", t, "--path-column", "file", "--keep-columns", "sku,price", "--model", model], 2,
         "--keep-columns 'price' is not a column"),
        (predict, ["--input", str(folder), "--keep-columns", "sku", "--model", model], 2, "give --input-table"),
        (predict, ["--input-table", t, "--path-column", "file", "--keep-columns", "error", "--model", model], 2,
         "the output has its own 'error' column"),
    ]  # fmt: skip


def test_each_refusal_is_one_line(small_csv, label_table, tmp_path, capsys):
    """In-process, as the jobs' main(argv) runs: each fails before any work, in one line."""
    import importlib

    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    out = ["--output-dir", str(tmp_path / "out")]
    for job, argv, code, message in refusal_cases(small_csv, label_table, str(model)):
        module = importlib.import_module(f"jobs.{job}")
        extra = out if job == "tune" else ["--output", str(tmp_path / "o.csv")] if job == "batch_predict" else []
        assert module.main([*argv, *extra]) == code, (job, argv)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "vit_model.pth").exists()


# --- end to end through Ray: train, evaluate, predict -------------------------------------------------


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(argv, out):
    from jobs import tune as tune_job

    assert tune_job.main([*argv, "--from-scratch", "--epochs", "1", "--output-dir", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_class_folders_train_evaluate_and_predict_from_a_table(class_folders, label_table, ray_session, tmp_path):
    from jobs import batch_predict, evaluate

    summary = train(["--data-dir", str(class_folders)], tmp_path / "results")
    data = summary["data"]
    assert data["labels"] == list(CLASSES) and data["source"].startswith("class folders")
    assert data["dropped"]["image file missing"] == 1
    assert data["dropped"]["class too small to split (Sandals)"] == 2 and data["small_classes_left_out"] == {
        "Sandals": 2
    }
    assert sum(data["split_sizes"].values()) == 3 * PER_CLASS
    model = str(tmp_path / "results" / "vit_model.pth")

    # Its own test split, rebuilt from the folders; then another source with the same labels.
    assert evaluate.main(["--model", model, "--output", str(tmp_path / "own")]) == 0
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert own["data"]["images"] == data["split_sizes"]["test"] == sum(map(sum, own["confusion_matrix"]))
    table, rows = label_table
    argv = ["--model", model, "--labels", str(table), "--image-column", "file", "--label-column", "category"]
    assert evaluate.main([*argv, "--output", str(tmp_path / "other")]) == 0
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert other["data"]["split"] == "all" and other["data"]["images"] == 3 * PER_CLASS - 1
    assert other["data"]["skipped_rows"]["image file missing"] == 1

    # Batch prediction from a CSV of relative paths, keys kept, beside a folder.
    catalogue, expected = catalogue_csv(tmp_path, table.parent, rows)
    extra = tmp_path / "more"
    for p in sorted((class_folders / "Footwear").iterdir())[:3]:
        link(p.parent, p.stem, extra / p.name)
    out = tmp_path / "pred.csv"
    argv = ["--input-table", str(catalogue), "--path-column", "image", "--keep-columns", "sku,product_id"]
    assert batch_predict.main([*argv, "--input", str(extra), "--model", model, "--output", str(out)]) == 0
    got = read_csv(out)
    assert list(got[0]) == ["sku", "product_id", "path", "predicted_category", "confidence", "error"]
    # Every table row exactly once, in the table's order, carrying its keys; then the folder's files by path.
    assert [(r["sku"], r["product_id"]) for r in got[: len(expected)]] == [(e[0], e[1]) for e in expected]
    assert [r["path"] for r in got[len(expected) :]] == sorted(str(p) for p in extra.iterdir())
    assert all(r["sku"] == "" for r in got[len(expected) :])
    for r, (_, _, image, why) in zip(got, expected, strict=False):
        assert r["path"] == (str(table.parent / image) if image else "")
        if why:
            assert why in r["error"] and r["predicted_category"] == ""
        else:
            assert r["error"] == "" and r["predicted_category"] in CLASSES


def catalogue_csv(tmp_path, images_root, rows):
    """A product export: keys with leading zeros, relative paths, a duplicate path, a
    missing file, a broken file and a row without a path. (sku, product_id, path, error)."""
    broken = images_root / "broken.jpg"
    data = (images_root / rows[0][1]).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    good = [(f"{i:06d}", str(r[0]), r[1], "") for i, r in enumerate(rows[:12])]
    expected = [
        *good[:6],
        ("900001", "1", "img/404.jpg", "No such file"),
        ("900004", "7", good[0][2], ""),  # the same image under another key: its own row
        ("900002", "2", "broken.jpg", "truncated"),
        ("900003", "3", "", "no path in the table"),
        *good[6:],
    ]
    path = tmp_path / "catalogue" / "export.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "sku", "image"])
        w.writerows(
            [pid, sku, os.path.relpath(images_root / img, path.parent) if img else ""] for sku, pid, img, _ in expected
        )
    return path, expected


@pytest.mark.slow
def test_a_label_table_trains_evaluates_and_predicts_keeping_typed_keys(label_table, ray_session, tmp_path):
    from jobs import batch_predict, evaluate

    table, rows = label_table
    argv = ["--labels", str(table), "--image-column", "file", "--label-column", "category"]
    summary = train(argv, tmp_path / "results")
    data = summary["data"]
    assert data["labels"] == list(CLASSES) and data["dropped"]["duplicate image (kept once)"] == 2
    assert sum(data["split_sizes"].values()) == 3 * PER_CLASS - 1
    model = str(tmp_path / "results" / "vit_model.pth")
    assert evaluate.main(["--model", model, "--output", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["data"]["images"] == data["split_sizes"]["test"] and report["data"]["source"] == f"table {table}"

    out = tmp_path / "pred.parquet"
    argv = ["--input-table", str(table), "--path-column", "file", "--keep-columns", "product_id,category"]
    assert batch_predict.main([*argv, "--model", model, "--output", str(out), "--top-k", "2"]) == 0
    got = pq.read_table(out)
    assert got.schema.field("product_id").type == pa.int64()  # Parquet keys keep their type
    assert got["product_id"].to_pylist() == [r[0] for r in rows]  # one row per table row, in order
    errors = got["error"].to_pylist()
    by_id = dict(zip(got["product_id"].to_pylist(), errors, strict=True))
    assert "No such file" in by_id[1] and by_id[2] == "no path in the table"
    assert errors.count("") == len(rows) - 2  # every other row, duplicates included, has a prediction
    assert set(got["predicted_category"].to_pylist()) <= {*CLASSES, ""}
