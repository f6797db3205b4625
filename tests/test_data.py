from __future__ import annotations

import os

import numpy as np
import pytest

from fashion_vit.config import MASTER_CATEGORIES, ConfigError, TrainConfig
from fashion_vit.data import DataError, load_data, read_styles_csv, stratified_sample, stratified_split
from fashion_vit.transforms import image_bytes
from tests.conftest import run_main, run_script

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


@pytest.fixture
def quirky_folder(tmp_path, shared_data, styles_rows):
    """A styles.csv with the original Kaggle file's quirks, over real images."""
    _, rows = styles_rows
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r[2], []).append(r)
    real = by_cat["Apparel"][:6] + by_cat["Footwear"][:4] + by_cat["Accessories"][:3] + by_cat["Home"][:1]
    (tmp_path / "images").mkdir()
    lines = [HEADER]
    for r in real:
        os.symlink(shared_data / "images" / f"{r[0]}.jpg", tmp_path / "images" / f"{r[0]}.jpg")
        lines.append(",".join(r))
    # Unquoted commas inside productDisplayName, the last column (22 such lines in Kaggle's file).
    a = by_cat["Apparel"][10]
    os.symlink(shared_data / "images" / f"{a[0]}.jpg", tmp_path / "images" / f"{a[0]}.jpg")
    lines.append(",".join(a[:9]) + ",Puma Men, Women Unisex, Blue Tshirt")
    lines.append("999999991,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,No image for this row")
    lines.append("999999992,Men,Apparel")  # truncated line
    b = by_cat["Apparel"][11]  # a real image whose row lost its label
    os.symlink(shared_data / "images" / f"{b[0]}.jpg", tmp_path / "images" / f"{b[0]}.jpg")
    lines.append(",".join([b[0], b[1], "", *b[3:]]))
    (tmp_path / "styles.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, a


def test_styles_csv_quirks_are_repaired_or_skipped_and_counted(quirky_folder):
    folder, repaired_row = quirky_folder
    table, repaired, skipped = read_styles_csv(str(folder / "styles.csv"))
    assert repaired == 1 and skipped == 1
    row = table[table["id"] == repaired_row[0]].iloc[0]
    assert row["productDisplayName"] == "Puma Men, Women Unisex, Blue Tshirt"
    assert row["masterCategory"] == "Apparel"


def test_load_data_drops_and_counts_unusable_rows(quirky_folder):
    folder, repaired_row = quirky_folder
    data = load_data(TrainConfig(data_dir=str(folder)))
    assert data.labels == list(MASTER_CATEGORIES)
    assert len(data.frame) == 6 + 4 + 3 + 1  # real rows + the repaired one; Home dropped
    assert data.repaired == 1
    assert data.dropped["image file missing"] == 1
    assert data.dropped["malformed line"] == 1
    assert data.dropped["no label"] == 1
    assert sum(v for k, v in data.dropped.items() if k.startswith("label outside")) == 1
    assert int(repaired_row[0]) in set(data.frame["id"])
    # Where each image is, not its bytes: Ray tasks read them, the driver never holds them.
    assert all(
        p == str(folder / "images" / f"{i}.jpg") for i, p in zip(data.frame["id"], data.frame["image"], strict=True)
    )
    assert all(image_bytes(p)[:2] == b"\xff\xd8" for p in data.frame["image"])
    assert "Home" in data.summary() and "repaired" in data.summary()


def test_other_label_column_takes_labels_from_data(samples):
    data = load_data(TrainConfig(data_dir=str(samples["train"]), label_column="subCategory"))
    assert data.labels == sorted(set(data.labels))
    assert "Topwear" in data.labels and "Shoes" in data.labels
    # A class too small to hold one image out for validation and one for test is left
    # out, counted under its own reason and named in the summary; every row is accounted for.
    assert data.small_classes and all(n < 3 for n in data.small_classes.values())
    for name, n in data.small_classes.items():
        assert data.dropped[f"class too small to split ({name})"] == n and f"{name} ({n})" in data.summary()
        assert name not in data.labels
    assert len(data.frame) + sum(data.dropped.values()) == 1500


def test_stratified_split_is_deterministic_disjoint_and_proportional(shared_data):
    data = load_data(TrainConfig(data_dir=str(shared_data), limit=3000, seed=7))
    labels = data.frame["label"].to_numpy()
    a = stratified_split(labels, 0.1, 0.1, seed=42)
    b = stratified_split(labels, 0.1, 0.1, seed=42)
    c = stratified_split(labels, 0.1, 0.1, seed=43)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["test"], c["test"])
    all_idx = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(all_idx) == len(labels) == len(set(all_idx.tolist()))
    for cls in np.unique(labels):
        n = (labels == cls).sum()
        n_test = (labels[a["test"]] == cls).sum()
        if n >= 3:
            assert n_test >= 1 and abs(n_test - n * 0.1) <= 1


def test_split_does_not_depend_on_row_order(quirky_folder, tmp_path):
    folder, _ = quirky_folder
    lines = (folder / "styles.csv").read_text().splitlines()
    (folder / "styles.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    d1 = load_data(TrainConfig(data_dir=str(folder)))
    assert list(d1.frame["id"]) == sorted(d1.frame["id"])


def test_stratified_sample_keeps_class_shares():
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    idx = stratified_sample(labels, 100, seed=0)
    assert len(idx) == 100
    assert np.bincount(labels[idx]).tolist() == [70, 20, 10]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "-1"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--data-dir", "/no/such/folder"], "is not a folder"),
        (["--label-column", "colour"], "--label-column"),
        (["--image-size", "100"], "multiple of the patch size"),
    ],
)
def test_invalid_flags_exit_2_with_one_line(flags, message, shared_data, capsys):
    from jobs import tune as tune_job

    argv = ["--data-dir", str(shared_data), *flags] if "--data-dir" not in flags else flags
    code, err = run_main(tune_job.main, argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # argparse adds its usage line


def test_config_validate_rejects_bad_values():
    with pytest.raises(ConfigError):
        TrainConfig(warmup_ratio=1.5).validate()
    with pytest.raises(ConfigError):
        TrainConfig(search="grid").validate()


def _offline_env(home):
    """The hub unreachable and its cache empty, whatever this machine has cached."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home))


def test_hub_dataset_offline_error_names_the_flag(tmp_path):
    proc = run_script("jobs/tune.py", "--epochs", "1", env=_offline_env(tmp_path))
    assert proc.returncode == 1
    assert "ashraq/fashion-product-images-small" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_hub_model_offline_error_names_the_flags(shared_data, tmp_path):
    proc = run_script("jobs/tune.py", "--data-dir", str(shared_data), "--limit", "50", env=_offline_env(tmp_path))
    assert proc.returncode == 1
    assert "google/vit-base-patch16-224-in21k" in proc.stderr
    assert "--from-scratch" in proc.stderr and "--model DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_load_data_unknown_label_column_is_a_data_error(quirky_folder):
    folder, _ = quirky_folder
    with pytest.raises(DataError, match="colour"):
        load_data(TrainConfig(data_dir=str(folder), label_column="colour"))


@pytest.mark.slow
def test_an_image_no_worker_can_read_stops_training_in_one_line(quirky_folder, ray_session, tmp_path):
    """What a node that cannot see --data-dir meets: the driver listed the image, the Ray
    task reading it cannot open it."""
    import numpy as np

    from fashion_vit.data import to_ray_datasets

    folder, _ = quirky_folder
    data = load_data(TrainConfig(data_dir=str(folder)))
    frame = data.frame.copy()
    frame.loc[3, "image"] = str(tmp_path / "elsewhere" / "123.jpg")  # on no disk this worker sees
    splits = {"train": np.arange(len(frame))}
    with pytest.raises(DataError, match=r"a Ray worker could not read .*elsewhere/123.jpg \(No such file or directory\): "
                       r"on a multi-node cluster the training images must be on storage every node can read"):  # fmt: skip
        to_ray_datasets(frame, splits, (80, 60))
    # A corrupt but readable image is still only skipped and counted.
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg")
    frame.loc[3, "image"] = str(tmp_path / "corrupt.jpg")
    datasets, undecodable = to_ray_datasets(frame, splits, (80, 60))
    assert undecodable == 1 and datasets["train"].count() == len(frame) - 1


def test_oversampling_repeats_rare_classes_spread_over_the_epoch():
    import numpy as np

    from fashion_vit.data import oversample

    labels = np.array([0] * 400 + [1] * 100 + [2] * 4)
    rows = np.arange(len(labels))
    assert oversample(rows, labels, "none", 0) is rows
    epoch = oversample(rows, labels, "sqrt", 0)
    assert np.bincount(labels[epoch]).tolist() == [400, 200, 40]  # x1, x2, x10
    assert sorted(set(epoch.tolist())) == rows.tolist()  # every row, none invented
    balanced = oversample(rows, labels, "balanced", 0)
    assert np.bincount(labels[balanced]).tolist() == [400, 400, 400]
    # Copies are spread: the 10 copies of a rare image do not sit next to each other.
    where = np.flatnonzero(epoch == 502)
    assert len(where) == 10 and np.diff(where).min() > 1
    assert np.array_equal(epoch, oversample(rows, labels, "sqrt", 0))  # seeded
    # A fractional factor is met in expectation, not rounded: sqrt(400 / 178) = 1.5.
    labels = np.array([0] * 400 + [1] * 178)
    epoch = oversample(np.arange(len(labels)), labels, "sqrt", 0)
    counts = np.bincount(epoch, minlength=len(labels))
    assert counts[:400].tolist() == [1] * 400 and set(counts[400:].tolist()) == {1, 2}
    assert abs(counts[400:].sum() - 178 * 1.5) < 15
