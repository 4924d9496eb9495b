"""Run-directory reports: training curves, modality-weight summaries, prediction tables."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS
from mer.evaluation.metrics import save_png


def plot_curves(history: list[dict[str, Any]], uri: str) -> str:
    """Training loss and validation WAF per epoch, one line per fold, to PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    folds = sorted({int(r["fold"]) for r in history})
    for k in folds:
        rows = sorted((r for r in history if int(r["fold"]) == k), key=lambda r: r["epoch"])
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_loss"] for r in rows], label=f"fold {k} train")
        axes[0].plot(ep, [r["val_loss"] for r in rows], linestyle="--", label=f"fold {k} val")
        axes[1].plot(ep, [r["val_waf"] for r in rows], label=f"fold {k}")
    axes[0].set_title("loss")
    axes[1].set_title("validation WAF")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, uri)


def weight_summary(y: np.ndarray, weights: np.ndarray, modalities: list[str]) -> dict[str, Any]:
    """Mean modality weight overall and per (true) class; classes without rows are left out."""
    out: dict[str, Any] = {"n": int(len(y)),
                           "overall": {m: float(weights[:, j].mean()) if len(y) else None
                                       for j, m in enumerate(modalities)},
                           "per_class": {}}
    for k, lab in enumerate(LABELS):
        sel = y == k
        if sel.any():
            out["per_class"][lab] = {m: float(weights[sel, j].mean()) for j, m in enumerate(modalities)}
    return out


def prediction_table(clip_ids: list[str], labels: list[str | None], probs: np.ndarray, weights: np.ndarray,
                     modalities: list[str], extra: dict[str, Any] | None = None) -> pa.Table:
    """clip_id, [extra…], label, pred_label, confidence, prob_<label>…, weight_<modality>…"""
    cols: dict[str, Any] = {"clip_id": pa.array(clip_ids, pa.string())}
    for k, v in (extra or {}).items():
        cols[k] = v
    cols["label"] = pa.array(labels, pa.string())
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    cols["pred_label"] = pa.array([LABELS[int(i)] for i in pred], pa.string())
    cols["confidence"] = pa.array(probs.max(axis=1) if len(probs) else np.zeros(0), pa.float32())
    for k, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(probs[:, k], pa.float32())
    for j, m in enumerate(modalities):
        cols[f"weight_{m}"] = pa.array(weights[:, j], pa.float32())
    return pa.table(cols)
