"""Reporting: render what a person looks at before trusting a classifier
(metrics.json, per_class.csv, confusion matrix, the most confident mistakes), and the
tune run's learning curves, picture of the search and model card. Scoring is
evaluate.py's job.

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


def stop_reason(trial: dict, epochs: int) -> str:
    """Why a trial ended: it ran all `epochs`, ASHA stopped it early, or it failed."""
    if trial["error"]:
        return "error"
    if trial["epochs_run"] < epochs:
        return f"stopped by ASHA after {trial['epochs_run']} epoch(s)"
    return "finished"


def _show(name: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if name == "lr" else f"{value:g}"
    return str(value)


def plot_search(trials: list[dict], space: dict, epochs: int, best_trial_id: str, path: str) -> None:
    """Each trial's sampled value of every searched hyperparameter (one panel each)
    against its best validation accuracy: a log axis for log-uniform values, one x
    position per choice (points spread sideways so that none hides another). Trials
    ASHA stopped are told apart from those that ran all `epochs`; the best is starred.
    `space`: tune.describe_space's {name: {"loguniform": [low, high]} or {"choice": [...]}}."""
    plt = _pyplot()
    scored = [t for t in trials if t["best_val_accuracy"] is not None]
    reason = lambda t: stop_reason(t, epochs).split(" after")[0]
    groups = (
        ("finished", {"marker": "o", "color": "tab:blue"}),
        ("stopped by ASHA", {"marker": "v", "color": "tab:orange"}),
        ("error", {"marker": "X", "color": "tab:red"}),
    )
    names = list(space)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1 + 3.4 * cols, 0.6 + 3.2 * rows), dpi=100, sharey=True, squeeze=False
    )
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        kind, values = next(iter(space[name].items()))
        x_of = _place_trials(ax, name, kind, values, scored)
        for label, style in groups:
            chosen = [t for t in scored if reason(t) == label]
            if not chosen and label == "error":
                continue
            ax.scatter(
                [x_of[t["trial_id"]] for t in chosen],
                [t["best_val_accuracy"] for t in chosen],
                label=f"{label} ({len(chosen)})",
                alpha=0.8,
                **style,
            )
        best = [t for t in scored if t["trial_id"] == best_trial_id]
        ax.scatter(
            [x_of[t["trial_id"]] for t in best],
            [t["best_val_accuracy"] for t in best],
            marker="*",
            s=250,
            facecolors="none",
            edgecolors="black",
            label="best",
        )
        ax.set_title(name)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("best validation accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    unscored = len(trials) - len(scored)
    fig.text(
        0.5,
        0.01,
        f"{len(trials)} trials, {epochs} epochs at most"
        + (f"; {unscored} trial(s) without any result not shown" if unscored else ""),
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1 - 0.08 / rows))
    _save(fig, path)


def _place_trials(ax, name: str, kind: str, values: list, scored: list[dict]) -> dict:
    """Each trial's x position on the panel of hyperparameter `name`, with the axis set
    for it: choices side by side around their slot, numbers on their (log) scale."""
    if kind == "choice":
        # Trials on the same choice sit side by side around its position.
        slot = {i: 0 for i in range(len(values))}
        taken = {i: sum(values.index(t["config"][name]) == i for t in scored) for i in slot}
        x_of = {}
        for t in scored:
            i = values.index(t["config"][name])
            x_of[t["trial_id"]] = i + (slot[i] - (taken[i] - 1) / 2) * min(0.1, 0.7 / taken[i])
            slot[i] += 1
        ax.set_xticks(range(len(values)), [_show(name, v) for v in values])
        ax.set_xlim(-0.5, len(values) - 0.5)
        return x_of
    low, high = values
    if kind == "loguniform":
        ax.set_xscale("log")
        ax.set_xlim(low / 1.2, high * 1.2)
    else:
        ax.set_xlim(low - (high - low) / 20, high + (high - low) / 20)
    return {t["trial_id"]: t["config"][name] for t in scored}


def trials_table(trials: list[dict], epochs: int, searched: list[str]) -> list[str]:
    """Markdown rows of every trial, best validation accuracy first: its number in the
    order trials were made, epochs run, why it stopped, the searched values."""
    noted = any(t.get("searcher_had_seen") is not None for t in trials)
    head = ["#", "trial", "best val accuracy", "epochs", "stopped", *searched]
    head += ["searcher had seen"] if noted else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = sorted(trials, key=lambda t: -(t["best_val_accuracy"] if t["best_val_accuracy"] is not None else -1))
    for t in ranked:
        acc = t["best_val_accuracy"]
        cells = [
            str(t.get("trial_number", "")),
            str(t["trial_id"]),
            f"{acc:.4f}" if acc is not None else "-",
            str(t["epochs_run"]),
            stop_reason(t, epochs),
            *(_show(k, t["config"].get(k, "")) for k in searched),
        ]
        if noted:
            seen = t.get("searcher_had_seen")
            cells.append("-" if seen is None else f"{seen} finished")
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return rows


def write_model_card(path: str, summary: dict, curves: str, search: str | None = None) -> None:
    """report.md beside vit_model.pth: data, labels, best hyperparameters, test metrics,
    the trials (best first) and the plots."""
    data, best = summary["data"], summary["best"]
    lines = [
        "# fashion-vit model card",
        "",
        f"- data: {data['source']}; split sizes " + ", ".join(f"{k} {v}" for k, v in data["split_sizes"].items()),
        f"- labels ({len(data['labels'])}): " + ", ".join(data["labels"]),
        "- skipped rows: " + (", ".join(f"{v} {k}" for k, v in data["dropped"].items() if v) or "none"),
        f"- model: {summary['train_config']['model'] if not summary['train_config']['from_scratch'] else 'ViT-' + summary['train_config']['vit_size'] + ' from scratch'}"
        f" at {summary['preprocessing']['image_size']}px, {summary['train_config'].get('recipe', 'pretrained')} recipe",
        f"- best trial {best['trial_id']} (trial {best.get('trial_number', '?')} of {len(summary['trials'])}), epoch {best['epoch']}: "
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
        *([f"![the search]({search})", ""] if search else []),
        "## Trials",
        "",
        f"{len(summary['trials'])} trial(s), best validation accuracy first; # is the order in which they were "
        "made (1 is the baseline). Per-epoch histories are in summary.json.",
        "",
        *trials_table(summary["trials"], summary["train_config"]["epochs"], list(summary.get("search_space", {}))),
    ]
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
