"""End to end through the real Ray path: jobs/tune.py -> Tune -> TorchTrainer -> export."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from fashion_vit.config import MASTER_CATEGORIES, RECIPES
from fashion_vit.model import load_checkpoint
from fashion_vit.predict import Predictor
from fashion_vit.transforms import decode_image
from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.slow


def test_baseline_exports_a_working_model_that_beats_the_majority_class(trained, samples):
    path = trained / "vit_model.pth"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["id2label"] == dict(enumerate(MASTER_CATEGORIES))
    # The scratch recipe, with the test's --epochs over it.
    assert raw["train_config"]["epochs"] == 4 and raw["train_config"]["from_scratch"] is True
    assert raw["train_config"]["recipe"] == "scratch" and raw["train_config"]["vit_size"] == "tiny"
    assert raw["preprocessing"]["image_size"] == 32

    summary = json.loads((trained / "summary.json").read_text())
    test = summary["best"]["test"]
    assert raw["metrics"]["test"] == test
    counts = summary["data"]["class_counts"]["test"]
    majority_rate = max(counts) / sum(counts)
    assert test["num_examples"] == sum(counts)
    assert test["accuracy"] > majority_rate + 0.1, (test["accuracy"], majority_rate)
    assert sum(map(sum, test["confusion_matrix"])) == sum(counts)
    assert set(test["per_class"]) == set(MASTER_CATEGORIES) and 0 < test["macro_f1"] <= 1

    trials = summary["trials"]
    assert len(trials) == 1 and trials[0]["epochs_run"] == 4
    for row in trials[0]["history"]:
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "epoch_seconds", "images_per_second"):
            assert key in row
    assert trials[0]["config"]["lr"] == pytest.approx(RECIPES["scratch"]["lr"])

    # The file alone rebuilds a working model, without Ray and without the hub.
    saved = load_checkpoint(str(path))
    _model, prep = saved.build()
    rows = samples["holdout_rows"][:64]
    images = torch.from_numpy(
        __import__("numpy").stack(
            [decode_image((samples["holdout"] / "images" / f"{r[0]}.jpg").read_bytes(), prep.source_size) for r in rows]
        )
    )
    out = Predictor(saved)({"image": images.numpy()})
    assert len(out["predicted_category"]) == 64 and set(out["predicted_category"]) <= set(MASTER_CATEGORIES)


def test_real_pretrained_weights_beat_the_same_run_from_scratch_and_predict(
    pretrained_weights, samples, ray_session, tmp_path
):
    """--model DIR with real ImageNet weights: a new 6-way head, the folder's mean/std and
    LayerNorm eps, position embeddings resampled from 224 to 48 px. One epoch on a few
    hundred images: the same run from random weights (same recipe and flags) is far behind."""
    from jobs import batch_predict
    from jobs import tune as tune_job

    common = ["--data-dir", str(samples["train"]), "--limit", "400", "--image-size", "48", "--epochs", "1"]
    common += ["--lr", "1e-4", "--batch-size", "16"]
    pre, scratch = tmp_path / "pretrained", tmp_path / "scratch"
    assert tune_job.main([*common, "--model", str(pretrained_weights), "--output-dir", str(pre)]) == 0
    raw = torch.load(pre / "vit_model.pth", weights_only=True)
    assert raw["train_config"]["model"] == str(pretrained_weights) and raw["train_config"]["from_scratch"] is False
    assert raw["state_dict"]["classifier.weight"].shape == (6, 192)  # the 1000-class ImageNet head is gone
    assert raw["vit_config"]["layer_norm_eps"] == 1e-6 and raw["vit_config"]["image_size"] == 48
    assert raw["state_dict"]["vit.embeddings.position_embeddings"].shape == (1, 1 + 3 * 3, 192)
    assert tuple(raw["preprocessing"]["mean"]) == (0.5, 0.5, 0.5)

    argv = [*common, "--recipe", "pretrained", "--from-scratch", "--vit-size", "tiny", "--output-dir", str(scratch)]
    assert tune_job.main(argv) == 0
    tested = [json.loads((d / "summary.json").read_text())["best"]["test"] for d in (pre, scratch)]
    assert tested[0]["num_examples"] == tested[1]["num_examples"]  # the same split
    assert tested[0]["accuracy"] > tested[1]["accuracy"] + 0.15, (tested[0]["accuracy"], tested[1]["accuracy"])

    out = tmp_path / "pred.csv"
    argv = ["--input", str(samples["holdout"] / "images"), "--model", str(pre / "vit_model.pth"), "--output", str(out)]
    assert batch_predict.main([*argv, "--quiet"]) == 0
    truth = {r[0]: r[2] for r in samples["holdout_rows"]}
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(truth)
    right = sum(truth[Path(r["path"]).stem] == r["predicted_category"] for r in rows)
    majority = max(Counter(truth.values()).values())
    assert right / len(rows) > majority / len(rows) + 0.2, (right, majority, len(rows))


def test_two_data_parallel_workers(samples, ray_session, tmp_path, monkeypatch):
    """--num-workers 2: DDP over gloo, validation metrics all-reduced across the shards.
    Without --mlflow-uri and --search optuna, the job imports neither package (a GPU
    machine's bundle may lack both): here any import of them fails."""
    from jobs import tune as tune_job

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "optuna", None)

    argv = [
        "--data-dir",
        str(samples["train"]),
        *TINY_ARGS,
        "--limit",
        "600",
        "--epochs",
        "1",
        "--num-workers",
        "2",
        # And oversampled rare classes, through DDP.
        "--sampling",
        "sqrt",
        "--output-dir",
        str(tmp_path),
    ]
    assert tune_job.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["trials"][0]["history"][0]
    assert summary["train_config"]["num_workers"] == 2 and summary["train_config"]["cpus_per_worker"] == 1
    # Validation accuracy counts every validation image once, across both shards.
    val_size = summary["data"]["split_sizes"]["val"]
    assert round(row["val_accuracy"] * val_size, 6) == round(row["val_accuracy"] * val_size)
    raw = torch.load(tmp_path / "vit_model.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in raw["state_dict"])  # DDP's wrapper not saved
    assert raw["state_dict"]["classifier.weight"].shape[0] == 6
    # --sampling sqrt: an epoch holds more rows than the training split, the rare ones repeated.
    assert summary["data"]["epoch_rows"] > summary["data"]["split_sizes"]["train"]
