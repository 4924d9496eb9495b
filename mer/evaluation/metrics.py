"""Classification metrics of the MER challenge: weighted-average F1 (WAF), accuracy, confusion.

Labels are class indices into :data:`mer.config.LABELS`. A prediction of ``-1`` (no prediction for a clip)
counts as wrong for every metric and is left out of the confusion matrix's columns.

The figures are scikit-learn's (``f1_score(labels=range(6), zero_division=0)``, ``accuracy_score``,
``confusion_matrix(labels=range(6))``), computed here with NumPy to the same float64 operations
(tests/test_evaluate.py compares them): every Ray Train worker scores each epoch, and importing
scikit-learn costs a new process over a second.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from mer.config import LABELS
from mer.store import storage

N_CLASSES = len(LABELS)


def _arrays(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} items, y_pred {p.size}")
    return t, p


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact matches (0.0 for empty input)."""
    t, p = _arrays(y_true, y_pred)
    return float(np.average(t == p)) if t.size else 0.0


def _f1_support(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 (0.0 where the class has no true and no predicted sample) and true support, over the classes
    0..5; a sample whose true or predicted index is outside them adds to no class's hits or predictions."""
    valid_t = (t >= 0) & (t < N_CLASSES)
    valid_p = (p >= 0) & (p < N_CLASSES)
    true_sum = np.bincount(t[valid_t], minlength=N_CLASSES)
    pred_sum = np.bincount(p[valid_p], minlength=N_CLASSES)
    tp_sum = np.bincount(t[valid_t & (t == p)], minlength=N_CLASSES)
    # scikit-learn's F-beta at beta = 1: (1 + b^2) tp / (b^2 true + pred), zero where the denominator is zero.
    denom = 1.0 * true_sum + pred_sum
    f1 = np.divide(2.0 * tp_sum, denom, out=np.zeros(N_CLASSES, dtype=np.float64), where=denom != 0)
    return f1, true_sum


def per_class_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """F1 of each class, keyed by label name (0.0 for a class with no true and no predicted sample)."""
    t, p = _arrays(y_true, y_pred)
    if not t.size:
        return {name: 0.0 for name in LABELS}
    f1, _ = _f1_support(t, p)
    return {name: float(v) for name, v in zip(LABELS, f1)}


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Weighted-average F1 (the MER2025 WAF): per-class F1 weighted by the class's true support."""
    t, p = _arrays(y_true, y_pred)
    if not t.size:
        return 0.0
    f1, support = _f1_support(t, p)
    if support.sum() == 0:
        return 0.0
    return float(np.average(f1, weights=support))


def weighted_f1_resampled(y_true: np.ndarray, y_pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`weighted_f1` of every resample at once: row ``r`` of ``counts`` (resamples × rows) says how often
    each row is drawn. The bootstrap of the label gate draws thousands; one scikit-learn call each would cost
    seconds per decision. Valid class indices only (no ``-1``)."""
    true1 = np.eye(N_CLASSES)[y_true]          # rows × classes
    pred1 = np.eye(N_CLASSES)[y_pred]
    support = counts @ true1                   # resamples × classes
    tp = counts @ (true1 * pred1)
    denom = support + counts @ pred1
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return (f1 * support).sum(axis=1) / np.maximum(support.sum(axis=1), 1)


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """Confusion matrix ``[true, pred]`` of shape (6, 6); rows with no prediction (-1) are not counted."""
    t, p = _arrays(y_true, y_pred)
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    both = (t >= 0) & (t < N_CLASSES) & (p >= 0) & (p < N_CLASSES)
    np.add.at(cm, (t[both], p[both]), 1)
    return cm


def plot_confusion(cm: np.ndarray, path_or_uri: str, title: str = "confusion matrix") -> str:
    """Render a confusion matrix (counts, row-normalised colours) to PNG at a local path or ``s3://`` URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(N_CLASSES), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(N_CLASSES), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_png(fig, path_or_uri)


def save_png(fig: Any, uri: str) -> str:
    """Write a matplotlib figure as PNG to a local path or ``s3://`` URI, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri
