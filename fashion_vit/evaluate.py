"""Evaluation: score a checkpoint on labelled images. `run` is the whole
`jobs/evaluate.py`; `score_test_split` is how the tune driver scores its best model once.
Rendering what is scored is report.py's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from fashion_vit.config import EvalConfig
from fashion_vit.metrics import confusion_matrix, format_report, honest_report
from fashion_vit.model import ModelError, SavedModel, load_checkpoint
from fashion_vit.transforms import decode_images, image_bytes


@dataclass
class Scored:
    """Predictions over a labelled set, kept with the decoded images for the error grid."""

    images: np.ndarray  # uint8 (N, H, W, 3) at the source size
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    ids: np.ndarray


def run(cfg: EvalConfig, log=print) -> dict:
    """Rebuild the data, score the checkpoint, write the report; returns the metrics.

    Without --data-dir, --labels or --dataset the checkpoint's own training data is reloaded and its
    deterministic split rebuilt, so `--split test` is the very test split it was scored
    on. Other data is scored whole (`--split all`). Rows whose label the model does not
    know are counted in the report, not guessed.
    """
    from fashion_vit.data import load_data, stratified_split
    from fashion_vit.report import write_eval_report

    saved = load_checkpoint(cfg.model)
    data_cfg = data_config(cfg, saved)
    split = "all" if _other_data(cfg) else cfg.split
    data = load_data(data_cfg, labels=saved.labels)
    if split == "all":
        frame = data.frame
    else:
        idx = stratified_split(
            data.frame["label"].to_numpy(), data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.seed
        )
        frame = data.frame.iloc[idx[split]]
    log(f"scoring {len(frame)} images ({split} of {data.source})")
    scored = score(saved, frame)
    report = honest_report(confusion_matrix(scored.y_true, scored.y_pred, len(saved.labels)), saved.labels)
    info = {
        "source": data.source,
        "split": split,
        "images": len(frame),
        "undecodable": int(len(frame) - len(scored.y_true)),
        "skipped_rows": data.dropped,
        "model": os.path.abspath(cfg.model),
    }
    write_eval_report(cfg.output, report, scored, saved.labels, info)
    log(format_report(report))
    return report


def _other_data(cfg: EvalConfig) -> bool:
    return any(v is not None for v in (cfg.data_dir, cfg.labels_table, cfg.dataset))


def data_config(cfg: EvalConfig, saved: SavedModel):
    """The TrainConfig whose data to score: the model's own (its split can be rebuilt),
    or the data named on the command line, read with the model's column names unless
    --image-column or --label-column say otherwise, whole (no --limit)."""
    from fashion_vit.config import TrainConfig

    trained_with = saved.trained_with()
    if not _other_data(cfg):
        if trained_with is None:
            raise ModelError(
                f"{cfg.model!r} does not say what data it was trained on: pass --data-dir, --labels or --dataset"
            )
        return trained_with
    base = trained_with or TrainConfig()
    return replace(
        base,
        data_dir=cfg.data_dir,
        labels_table=cfg.labels_table,
        dataset=cfg.dataset or base.dataset,
        image_column=cfg.image_column or base.image_column,
        label_column=cfg.label_column or base.label_column,
        limit=None,
    )


def score(saved: SavedModel, frame, batch_size: int = 256) -> Scored:
    """Run the checkpoint over `frame` (columns id, label, image bytes) in this process.
    Undecodable images are left out (the caller counts them)."""
    from fashion_vit.predict import Predictor

    predictor = Predictor(saved)
    images, errors = decode_images(frame["image"].tolist(), saved.preprocessing.source_size, read=image_bytes)
    ok = errors == ""
    images = images[ok]
    label_index = {name: i for i, name in enumerate(saved.labels)}
    y_pred, conf = [], []
    for start in range(0, len(images), batch_size):
        out = predictor({"image": images[start : start + batch_size]})
        y_pred += [label_index[c] for c in out["predicted_category"]]
        conf.append(out["confidence"])
    rows = frame[ok]
    return Scored(
        images=images,
        y_true=rows["label"].to_numpy(np.int64),
        y_pred=np.asarray(y_pred, np.int64),
        confidence=np.concatenate(conf) if conf else np.zeros(0),
        ids=rows["id"].to_numpy(),
    )


def score_test_split(saved: SavedModel, test_ds) -> dict:
    """Test metrics of one checkpoint over a Ray Dataset (image, label), computed once,
    with the batch-inference predictor."""
    from fashion_vit.predict import predict_labelled

    y_true, y_pred = predict_labelled(saved, test_ds)
    return honest_report(confusion_matrix(y_true, y_pred, len(saved.labels)), saved.labels)
