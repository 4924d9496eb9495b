"""The acceptance gate of the label loop: is a stage better on labelled rows it never trained on?

The gate figure of a run is its **out-of-fold WAF against the original labels**: every run of the loop uses the
same folds (drawn over the store's labelled train rows, :func:`mer.train.run.cv_folds`), so each labelled clip
is scored by the fold model that did not train on it, and it is compared with the label the annotators gave
— not with a refined label, which would let a stage confirm itself. Pseudo-labels for fold ``k`` come only
from fold ``k``'s models (:mod:`mer.labels.pseudolabel`), so no validation row reaches its fold's training
through the pool, and the refinement is decided per fold with fold ``k``'s models' votes for the same reason
(:func:`mer.labels.relabel.refine_labels_per_fold`: out-of-fold votes distilled fold ``k``'s labels into the
model judged on them; the gate then overstated the refinement, +0.03 gate WAF for a stage whose test WAF fell).
``labels.min_gain`` > 0 demands a margin. Every decision also gives the
paired-bootstrap share of resamples of the labelled clips in which the stage wins (:func:`better_share`);
``labels.gate_confidence`` > 0 demands it. ``mer bench labels`` checks the decisions against a test split the
loop never sees.

Each fold contributes its best validation epoch's predictions, which flatters every stage (0.02–0.06 on the demo's
store). Figures that select less were compared on 105 benched refined and round stages: the mean of the last five
epochs, a window around the best epoch, the top three epochs, the lowest validation loss. Each predicted the
stage's test-split change worse than this one (correlation ≤ 0.49 against 0.65; docs/results.md,
`mer bench labels`, "gate figures with less epoch selection").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.config import PROB_COLUMNS
from mer.evaluation.metrics import accuracy, weighted_f1, weighted_f1_resampled
from mer.store import storage
from mer.train.features import label_index


def oof_predictions(run_uri: str, original: dict[str, str]) -> dict[str, int]:
    """{clip_id: predicted class} of a run's out-of-fold rows that have an original label: what the gate
    judges (read once per stage; :func:`gate_figures` and :func:`better_share` take it)."""
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"))
    ids = oof.column("clip_id").to_pylist()
    probs = np.stack([np.asarray(oof.column(c).to_numpy(zero_copy_only=False), np.float64)
                      for c in PROB_COLUMNS], axis=1)
    pred = probs.argmax(axis=1)
    return {c: int(p) for c, p in zip(ids, pred) if c in original}


def gate_figures(run_uri: str, original: dict[str, str], pred: dict[str, int] | None = None) -> dict[str, Any]:
    """Out-of-fold WAF and accuracy of ``run_uri`` against ``original`` labels ({clip_id: label});
    ``pred``: its :func:`oof_predictions` when the caller already has them."""
    pred = oof_predictions(run_uri, original) if pred is None else pred
    if not pred:
        raise ValueError(f"run {run_uri}: none of its out-of-fold rows has an original label")
    y = label_index([original[c] for c in pred])
    p = np.fromiter(pred.values(), np.int64, len(pred))
    return {"waf": weighted_f1(y, p), "accuracy": accuracy(y, p), "n": len(pred)}


def better_share(cand: dict[str, int], best: dict[str, int], original: dict[str, str], *, min_gain: float = 0.0,
                 resamples: int = 2000, seed: int = 0) -> float:
    """Paired bootstrap over the labelled clips both runs scored out of fold (their :func:`oof_predictions`):
    the share of resamples in which the candidate's gate WAF exceeds the best run's by more than ``min_gain``.
    Near 1: the gain is not an accident of which clips the gate set holds; near 0.5 or below: it could well
    be."""
    ids = [c for c in cand if c in best]
    if not ids:
        return 0.0
    y = label_index([original[c] for c in ids])
    pc = np.array([cand[c] for c in ids], np.int64)
    pb = np.array([best[c] for c in ids], np.int64)
    n = len(ids)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    diff = weighted_f1_resampled(y, pc, counts) - weighted_f1_resampled(y, pb, counts)
    return float(np.mean(diff > min_gain + 1e-12))


def decide(candidate: float, best: float, min_gain: float, *, share: float | None = None,
           confidence: float = 0.0) -> tuple[bool, str]:
    """Accept a stage whose gate WAF is at least the best accepted one's plus ``min_gain`` and, when
    ``confidence`` > 0, whose bootstrap ``share`` (:func:`better_share`) is at least that; say why (the share is
    always said: "better in 52 % of resamples" is a coin flip, whatever the gate decided)."""
    ok = candidate >= best + min_gain - 1e-12
    rel = "≥" if ok else "<"
    why = f"gate WAF {candidate:.4f} {rel} {best:.4f}" + (f" + {min_gain:g}" if min_gain else "")
    if share is not None:
        why += f"; better in {share:.0%} of bootstrap resamples"
        if confidence > 0:
            sure = share >= confidence - 1e-12
            why += f" ({'≥' if sure else '<'} {confidence:.0%} asked)"
            ok = ok and sure
    return ok, why
