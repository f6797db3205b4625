"""Classification metrics, all derived from one confusion matrix.

Computed here rather than with `evaluate.load(...)`: that call fetches each metric's
script from the Hugging Face hub (it fails offline, as on air-gapped clusters), and a
confusion matrix is also what data-parallel workers can sum with one all-reduce, so
validation metrics over sharded data are exact.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true labels, columns predictions."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    Macro-F1 averages over classes present in the data (support > 0), so a class absent
    from a small sample does not count as a zero. Precision of a never-predicted class is 0.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = int(cm.sum())
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "num_examples": total,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


COMMON_SHARE = 0.01  # a class with at least this share of the rows counts as common
BOOTSTRAP_REPS = 2000


def honest_report(cm: np.ndarray, labels: list[str], seed: int = 0) -> dict:
    """classification_report plus what a macro-F1 over rare classes needs beside it:
    a bootstrap 95% interval, and the macro-F1 over the common classes alone.

    With 2 Sporting Goods and 10 Free Items among ~4,000 test images, one image moves a
    rare class's F1 by 0.3 and macro-F1 by 0.05: the interval says how far to trust it."""
    report = classification_report(cm, labels)
    lo, hi = bootstrap_macro_f1(cm, seed=seed)
    support = np.asarray(cm).sum(axis=1)
    common = [i for i in range(len(labels)) if support[i] >= COMMON_SHARE * support.sum() and support[i] > 0]
    report["macro_f1_ci95"] = [lo, hi]
    report["common_classes"] = [labels[i] for i in common]
    report["macro_f1_common"] = (
        float(np.mean([report["per_class"][labels[i]]["f1"] for i in common])) if common else 0.0
    )
    return report


def bootstrap_macro_f1(cm: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of macro-F1 over test sets resampled with replacement.
    Resampling rows is drawing the cells of the confusion matrix multinomially, so the
    matrix is all it needs."""
    cm = np.asarray(cm, dtype=np.int64)
    n, k = int(cm.sum()), cm.shape[0]
    if n == 0:
        return 0.0, 0.0
    draws = np.random.default_rng(seed).multinomial(n, cm.ravel() / n, size=reps).reshape(reps, k, k)
    tp = np.diagonal(draws, axis1=1, axis2=2).astype(float)
    support, predicted = draws.sum(axis=2), draws.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = support > 0  # as in classification_report: a class absent from a draw is left out
    macro = (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    lo, hi = np.percentile(macro, [2.5, 97.5])
    return float(lo), float(hi)


def format_report(report: dict) -> str:
    """A fixed-width per-class table for logs and the README."""
    lines = [f"{'class':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8d}")
    line = f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}"
    if "macro_f1_ci95" in report:
        lo, hi = report["macro_f1_ci95"]
        line += f" (95% CI {lo:.3f}-{hi:.3f}; {report['macro_f1_common']:.4f} over {len(report['common_classes'])} common classes)"
    lines.append(line + f"   n={report['num_examples']}")
    return "\n".join(lines)
