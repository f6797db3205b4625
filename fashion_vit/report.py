"""Reporting: score a checkpoint on labelled data and write what a person looks at
before trusting a classifier (metrics.json, per_class.csv, confusion matrix, the most
confident mistakes), plus the tune run's learning curves and model card.

Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np

from fashion_vit.config import EvalConfig, TrainConfig
from fashion_vit.metrics import classification_report, confusion_matrix, format_report
from fashion_vit.predict import Predictor
from fashion_vit.transforms import Preprocessing, decode_image

ERRORS_SHOWN = 16


def run_evaluation(cfg: EvalConfig, log=print) -> dict:
    """The whole `jobs/evaluate.py`: rebuild the data, score the checkpoint, write the report.

    Without --data-dir/--dataset the checkpoint's own training data is reloaded and its
    deterministic split rebuilt, so `--split test` is the very test split it was scored
    on. Other data is scored whole (`--split all`). Rows whose label the model does not
    know are counted in the report, not guessed.
    """
    from dataclasses import fields

    from fashion_vit.data import load_data, stratified_split
    from fashion_vit.model import ModelError, load_checkpoint

    payload = load_checkpoint(cfg.model)
    labels = [payload["id2label"][i] for i in range(len(payload["id2label"]))]
    trained_on = {k: v for k, v in payload.get("train_config", {}).items() if k in {f.name for f in fields(TrainConfig)}}
    own_data = cfg.data_dir is None and cfg.dataset is None
    if own_data and not trained_on:
        raise ModelError(f"{cfg.model!r} does not say what data it was trained on: pass --data-dir or --dataset")
    train_cfg = TrainConfig(**trained_on)
    if not own_data:
        train_cfg.data_dir, train_cfg.limit = cfg.data_dir, None
        train_cfg.dataset = cfg.dataset or train_cfg.dataset
    split = cfg.split if own_data else "all"
    data = load_data(train_cfg, labels=labels)
    if split == "all":
        frame = data.frame
    else:
        idx = stratified_split(data.frame["label"].to_numpy(), train_cfg.val_fraction, train_cfg.test_fraction, train_cfg.seed)
        frame = data.frame.iloc[idx[split]]
    log(f"scoring {len(frame)} images ({split} of {data.source})")
    scored = score(payload, frame)
    info = {
        "source": data.source,
        "split": split,
        "images": int(len(frame)),
        "undecodable": int(len(frame) - len(scored.y_true)),
        "skipped_rows": data.dropped,
        "model": os.path.abspath(cfg.model),
    }
    report = write_eval_report(cfg.output, scored, labels, info)
    log(format_report(report))
    return report


@dataclass
class Scored:
    """Predictions over a labelled set, kept with the decoded images for the error grid."""

    images: np.ndarray  # uint8 (N, H, W, 3) at the source size
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    ids: np.ndarray


def score(payload: dict, frame, batch_size: int = 256) -> Scored:
    """Run the checkpoint over `frame` (columns id, label, image bytes) in this process.

    Undecodable images are skipped (their ids are listed in the caller's counts).
    """
    prep = Preprocessing.from_dict(payload["preprocessing"])
    predictor = Predictor(payload)
    label_index = {name: i for i, name in payload["id2label"].items()}
    images, keep = [], []
    for i, data in enumerate(frame["image"]):
        try:
            images.append(decode_image(data, prep.source_size))
            keep.append(i)
        except ValueError:
            continue
    images = np.stack(images) if images else np.zeros((0, *prep.source_size, 3), np.uint8)
    y_pred, conf = [], []
    for start in range(0, len(images), batch_size):
        out = predictor({"image": images[start : start + batch_size]})
        y_pred += [label_index[c] for c in out["predicted_category"]]
        conf.append(out["confidence"])
    rows = frame.iloc[keep]
    return Scored(
        images=images,
        y_true=rows["label"].to_numpy(np.int64),
        y_pred=np.asarray(y_pred, np.int64),
        confidence=np.concatenate(conf) if conf else np.zeros(0),
        ids=rows["id"].to_numpy(),
    )


def write_eval_report(out_dir: str, scored: Scored, labels: list[str], data_info: dict) -> dict:
    """metrics.json, per_class.csv, confusion_matrix.png and errors.png under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    report = classification_report(confusion_matrix(scored.y_true, scored.y_pred, len(labels)), labels)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({**report, "data": data_info}, f, indent=2)
    with open(os.path.join(out_dir, "per_class.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for name, m in report["per_class"].items():
            w.writerow([name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]])
    plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, os.path.join(out_dir, "confusion_matrix.png"))
    plot_errors(scored, labels, os.path.join(out_dir, "errors.png"))
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str) -> None:
    """Counts on the left, rows normalised to recall on the right."""
    plt = _pyplot()
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    side = 1.5 + 0.75 * len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), dpi=100)
    for ax, values, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], normalised, "row-normalised (recall)", ".2f")):
        ax.imshow(values, cmap="Blues")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = values.max() if values.size else 0
        for i in range(len(labels)):
            for j in range(len(labels)):
                v = values[i, j]
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="white" if top and v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_errors(scored: Scored, labels: list[str], path: str, n: int = ERRORS_SHOWN) -> None:
    """A grid of the most confident mistakes, each titled with true and predicted label."""
    plt = _pyplot()
    wrong = np.flatnonzero(scored.y_true != scored.y_pred)
    wrong = wrong[np.argsort(-scored.confidence[wrong], kind="stable")][:n]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0, 0.5, "no mistakes", fontsize=12)
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(scored.images[i])
        ax.set_title(
            f"id {scored.ids[i]}\ntrue: {labels[scored.y_true[i]]}\npred: {labels[scored.y_pred[i]]} ({scored.confidence[i]:.2f})",
            fontsize=8,
        )
    fig.suptitle("most confident mistakes")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_learning_curves(trials: list[dict], best_trial_id: str, path: str) -> None:
    """Train/validation loss and validation accuracy per epoch, one line per trial; the
    best trial drawn bold. Trials ASHA stopped are the shorter lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for t in trials:
        h = t["history"]
        if not h:
            continue
        epochs = [r["epoch"] for r in h]
        best = t["trial_id"] == best_trial_id
        style = {"linewidth": 2.5 if best else 1.0, "alpha": 1.0 if best else 0.6, "marker": "o" if best else "."}
        name = f"{t['trial_id']} (lr {t['config'].get('lr', float('nan')):.1e})" + (" best" if best else "")
        for ax, key in zip(axes, ("train_loss", "val_loss", "val_accuracy")):
            ax.plot(epochs, [r[key] for r in h], label=name, **style)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("train loss", "validation loss", "validation accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(path: str, summary: dict, curves: str) -> None:
    """report.md beside vit_model.pth: data, labels, best hyperparameters, test metrics."""
    data, best = summary["data"], summary["best"]
    lines = [
        "# fashion-vit model card",
        "",
        f"- data: {data['source']}; split sizes " + ", ".join(f"{k} {v}" for k, v in data["split_sizes"].items()),
        f"- labels ({len(data['labels'])}): " + ", ".join(data["labels"]),
        "- skipped rows: " + (", ".join(f"{v} {k}" for k, v in data["dropped"].items() if v) or "none"),
        f"- model: {summary['train_config']['model'] if not summary['train_config']['from_scratch'] else 'ViT-' + summary['train_config']['vit_size'] + ' from scratch'}"
        f" at {summary['preprocessing']['image_size']}px, {summary['train_config'].get('recipe', 'pretrained')} recipe",
        f"- best trial {best['trial_id']}, epoch {best['epoch']}: "
        + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in best["config"].items()),
        f"- validation accuracy {best['val']['val_accuracy']:.4f}, macro-F1 {best['val']['val_macro_f1']:.4f}",
        "",
        "## Test split (scored once, for this model)",
        "",
        "```",
        format_report(best["test"]),
        "```",
        "",
        f"![learning curves]({curves})",
        "",
        f"{len(summary['trials'])} trial(s); per-epoch histories are in summary.json.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
