"""Reporting: render what a person looks at before trusting a classifier
(metrics.json, per_class.csv, confusion matrix, the most confident mistakes), and the
tune run's learning curves and model card. Scoring is evaluate.py's job.

Every file is written atomically. Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from fashion_vit.files import atomic_open
from fashion_vit.metrics import format_report

ERRORS_SHOWN = 16


def write_eval_report(out_dir: str, report: dict, scored, labels: list[str], data_info: dict) -> None:
    """metrics.json, per_class.csv, confusion_matrix.png and errors.png under out_dir,
    each written atomically. `scored`: evaluate.Scored."""
    with atomic_open(os.path.join(out_dir, "metrics.json")) as f:
        json.dump({**report, "data": data_info}, f, indent=2)
    with atomic_open(os.path.join(out_dir, "per_class.csv"), newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for name, m in report["per_class"].items():
            w.writerow([name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]])
    plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, os.path.join(out_dir, "confusion_matrix.png"))
    plot_errors(scored, labels, os.path.join(out_dir, "errors.png"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    _pyplot().close(fig)


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str) -> None:
    """Counts on the left, rows normalised to recall on the right."""
    plt = _pyplot()
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    side = 1.5 + 0.75 * len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), dpi=100)
    for ax, values, title, fmt in (
        (axes[0], cm, "counts", "d"),
        (axes[1], normalised, "row-normalised (recall)", ".2f"),
    ):
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
                ax.text(
                    j,
                    i,
                    format(v, fmt),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if top and v > top / 2 else "black",
                )
    fig.tight_layout()
    _save(fig, path)


def plot_errors(scored, labels: list[str], path: str, n: int = ERRORS_SHOWN) -> None:
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
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        ax.imshow(scored.images[i])
        ax.set_title(
            f"id {scored.ids[i]}\ntrue: {labels[scored.y_true[i]]}\npred: {labels[scored.y_pred[i]]} ({scored.confidence[i]:.2f})",
            fontsize=8,
        )
    fig.suptitle("most confident mistakes")
    fig.tight_layout()
    _save(fig, path)


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
        for ax, key in zip(axes, ("train_loss", "val_loss", "val_accuracy"), strict=False):
            ax.plot(epochs, [r[key] for r in h], label=name, **style)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("train loss", "validation loss", "validation accuracy"), strict=False):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


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
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
