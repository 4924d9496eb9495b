"""The acceptance gate of the label loop: is a stage better on labelled rows it never trained on?

The gate figure of a run is its **out-of-fold WAF against the original labels**: every run of the loop uses the
same folds (drawn over the store's labelled train rows, :func:`mer.train.run.cv_folds`), so each labelled clip
is scored by the fold model that did not train on it, and it is compared with the label the annotators gave
— not with a refined label, which would let a stage confirm itself. Pseudo-labels for fold ``k`` come only
from fold ``k``'s models (:mod:`mer.labels.pseudolabel`), so no validation row reaches its fold's training
through the pool. Refinement is the one stage whose training labels were decided with out-of-fold votes of
models that did see the other folds' rows: a second-order leak that can make its gate figure a little
optimistic. ``labels.min_gain`` > 0 demands a margin; ``mer bench labels`` checks the decisions against a test
split the loop never sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer import storage
from mer.config import PROB_COLUMNS
from mer.metrics import accuracy, weighted_f1
from mer.train.features import label_index


def gate_figures(run_uri: str, original: dict[str, str]) -> dict[str, Any]:
    """Out-of-fold WAF and accuracy of ``run_uri`` against ``original`` labels ({clip_id: label})."""
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"))
    ids = oof.column("clip_id").to_pylist()
    keep = np.array([c in original for c in ids], dtype=bool)
    if not keep.any():
        raise ValueError(f"run {run_uri}: none of its out-of-fold rows has an original label")
    probs = np.stack([np.asarray(oof.column(c).to_numpy(zero_copy_only=False), np.float64)
                      for c in PROB_COLUMNS], axis=1)[keep]
    y = label_index([original[c] for c, k in zip(ids, keep) if k])
    pred = probs.argmax(axis=1)
    return {"waf": weighted_f1(y, pred), "accuracy": accuracy(y, pred), "n": int(keep.sum())}


def decide(candidate: float, best: float, min_gain: float) -> tuple[bool, str]:
    """Accept a stage whose gate WAF is at least the best accepted one's plus ``min_gain``; say why."""
    ok = candidate >= best + min_gain - 1e-12
    rel = "≥" if ok else "<"
    return ok, f"gate WAF {candidate:.4f} {rel} {best:.4f}" + (f" + {min_gain:g}" if min_gain else "")
