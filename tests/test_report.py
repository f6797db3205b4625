"""The tune run's report, jobs/evaluate.py, and continuing from a saved model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_vit.config import MASTER_CATEGORIES, TrainConfig
from fashion_vit.data import load_data, stratified_split
from fashion_vit.model import ModelError, create_model, load_checkpoint
from fashion_vit.transforms import decode_image, image_bytes, preprocess
from tests.conftest import make_kaggle_folder, run_main, run_script

pytestmark = pytest.mark.slow


def assert_png(path, min_w=300, min_h=200):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_w and img.height >= min_h
        assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_tune_writes_learning_curves_and_model_card(trained):
    assert_png(trained / "learning_curves.png", 800, 250)
    card = (trained / "report.md").read_text()
    summary = json.loads((trained / "summary.json").read_text())
    assert f"{summary['best']['test']['accuracy']:.4f}" in card
    assert "learning_curves.png" in card and "Apparel" in card


def test_evaluate_rebuilds_the_test_split_and_agrees_with_a_direct_recomputation(trained, tmp_path):
    from jobs import evaluate

    model_path = trained / "vit_model.pth"
    out = tmp_path / "report"
    assert evaluate.main(["--model", str(model_path), "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("confusion_matrix.png", "errors.png"):
        assert_png(out / name)
    with open(out / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == list(MASTER_CATEGORIES)

    # Direct recomputation: rebuild the split by hand and run the model without the library's scorer.
    saved = load_checkpoint(str(model_path))
    cfg = TrainConfig(**saved.train_config)
    data = load_data(cfg)
    test = data.frame.iloc[
        stratified_split(data.frame["label"].to_numpy(), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    ]
    model, prep = saved.build()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([decode_image(image_bytes(b), prep.source_size) for b in test["image"]]))
        pred = model(pixel_values=preprocess(x, prep)).logits.argmax(1).numpy()
    truth = test["label"].to_numpy()
    assert metrics["data"]["images"] == len(test) == sum(map(sum, metrics["confusion_matrix"]))
    assert metrics["accuracy"] == pytest.approx((pred == truth).mean())
    for i, name in enumerate(MASTER_CATEGORIES):
        tp = int(((pred == i) & (truth == i)).sum())
        assert metrics["per_class"][name]["support"] == int((truth == i).sum())
        if (pred == i).any():
            assert metrics["per_class"][name]["precision"] == pytest.approx(tp / (pred == i).sum())
    # The same split and model as the test report tune.py stored in the checkpoint.
    assert metrics["accuracy"] == pytest.approx(saved.metrics["test"]["accuracy"])


def test_evaluate_other_data_reports_unknown_labels(trained, samples, styles_rows, shared_data, tmp_path):
    header, _ = styles_rows
    rows = [list(r) for r in samples["holdout_rows"][:60]]
    rows[0][2] = "Jewellery"  # a label the model never saw
    rows[1][2] = "Jewellery"
    folder = make_kaggle_folder(tmp_path / "other", header, rows, shared_data / "images")
    out = tmp_path / "report"
    model = str(trained / "vit_model.pth")
    proc = run_script("jobs/evaluate.py", "--model", model, "--data-dir", str(folder), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["split"] == "all" and metrics["data"]["images"] == 58
    assert metrics["data"]["skipped_rows"]["label outside the label set (Jewellery)"] == 2


def test_init_from_continues_from_the_saved_weights(trained, samples, ray_session, tmp_path):
    from jobs import tune as tune_job

    before = json.loads((trained / "summary.json").read_text())
    saved_val = before["best"]["val"]["val_accuracy"]
    fresh_first_epoch = before["trials"][0]["history"][0]["val_accuracy"]  # a fresh tiny model, same data
    out = tmp_path / "continued"
    argv = [
        "--data-dir",
        str(samples["train"]),
        "--init-from",
        str(trained / "vit_model.pth"),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--lr",
        "1e-5",
        "--output-dir",
        str(out),
    ]
    assert tune_job.main(argv) == 0
    first = json.loads((out / "summary.json").read_text())["trials"][0]["history"][0]["val_accuracy"]
    assert first >= saved_val - 0.03, (first, saved_val)
    assert first > fresh_first_epoch + 0.05, (first, fresh_first_epoch)


def test_init_from_with_other_labels_needs_reinit_head(trained):
    saved_model = load_checkpoint(str(trained / "vit_model.pth"))
    labels = ["Topwear", "Bottomwear", "Shoes"]
    cfg = TrainConfig(init_from=str(trained / "vit_model.pth"), image_size=32, label_column="subCategory")
    with pytest.raises(ModelError, match="--reinit-head"):
        create_model(cfg, labels, saved_model)
    cfg.reinit_head = True
    model, _ = create_model(cfg, labels, saved_model)
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "Shoes"
    saved, _ = saved_model.build()
    key = "vit.embeddings.patch_embeddings.projection.weight"
    torch.testing.assert_close(model.state_dict()[key], saved.state_dict()[key])


def test_init_from_label_mismatch_is_one_line_from_the_job(trained, samples, capsys):
    from jobs import tune as tune_job

    data, model = str(samples["train"]), str(trained / "vit_model.pth")
    argv = ["--data-dir", data, "--label-column", "subCategory", "--init-from", model, "--image-size", "32"]
    code, err = run_main(tune_job.main, argv, capsys)
    assert code == 1 and "--reinit-head" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
