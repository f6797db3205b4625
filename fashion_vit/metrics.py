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


def format_report(report: dict) -> str:
    """A fixed-width per-class table for logs and the README."""
    lines = [f"{'class':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8d}")
    lines.append(f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   n={report['num_examples']}")
    return "\n".join(lines)
