"""How much each label source's vote is worth, and how votes combine into a posterior over the six labels.

A *source* gives, per clip, either class probabilities (a trained run's out-of-fold or pool predictions, an
external model's ``prob_<label>`` table) or a single label (an LLM vote, an external ``label`` table), or no
vote. Its **reliability** is measured on labelled rows, per class, against the original labels:

- a probability source gets one weight per class, ``alpha[c]``, fitted so that
  ``softmax(alpha[c] * (log p[c] - log prior[c]) + log prior[c])`` best predicts the original labels
  (temperature scaling per class, shrunk towards the source's mean weight). A source that is right about
  happy clips but not about worried ones keeps its say on happy; a source at chance gets weights near 0.
- a label source gets its per-class precision: of the labelled clips it called ``c``, the share whose label
  is ``c`` (smoothed towards chance, 1/6).

Reliabilities are measured against noisy labels, so they understate a source a little; they are never fitted
on the clip they then judge beyond that shared handful of weights (the probabilities themselves are
out-of-fold). Each source contributes its **evidence** ``log P(y=c | source) - log P(y=c)`` and the sources
combine as independent experts: ``posterior ∝ prior * exp(sum of evidence)``. The original annotation is one
more label source whose precision is ``relabel.annotation_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mer.config import LABELS

K = len(LABELS)
# Probabilities are clipped here before taking logs: one overconfident zero must not veto a class alone.
PROB_FLOOR = 1e-4


@dataclass
class Reliability:
    """A source's measured reliability on labelled rows and the per-class weights its votes get."""

    name: str
    kind: Literal["probs", "label"]
    weight: np.ndarray  # [K]: alpha per class (probs) or precision per class (label)
    n_votes: int = 0
    accuracy: float | None = None
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""
    usable: bool = True  # False: too few labelled votes to measure it; its votes then carry no evidence

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (written next to every label table the loop produces)."""
        key = "alpha" if self.kind == "probs" else "precision"
        return {"source": self.name, "kind": self.kind, key: {lab: round(float(w), 4)
                                                            for lab, w in zip(LABELS, self.weight)},
                "n_labelled_votes": self.n_votes,
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4),
                "per_class": self.per_class, "usable": self.usable, "note": self.note}


def class_prior(y: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """Smoothed class frequencies of label indices ``y`` (never exactly 0)."""
    counts = np.bincount(y[y >= 0], minlength=K).astype(np.float64)
    return (counts + smoothing) / (counts.sum() + smoothing * K)


def has_vote(probs: np.ndarray) -> np.ndarray:
    """Rows (any leading shape) whose probability vector is a vote (finite, not all zero)."""
    return np.isfinite(probs).all(axis=-1) & (np.nan_to_num(probs).sum(axis=-1) > 0)


def votes_of(probs: np.ndarray) -> np.ndarray:
    """Each row's voted class index (argmax), -1 where the source has no vote."""
    ok = has_vote(probs)
    return np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=-1), -1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _report(votes: np.ndarray, y: np.ndarray) -> tuple[float | None, dict[str, dict[str, float]]]:
    """Accuracy and per-class precision/recall of hard votes against labels (rows with a vote)."""
    ok = votes >= 0
    if not ok.any():
        return None, {}
    v, t = votes[ok], y[ok]
    per: dict[str, dict[str, float]] = {}
    for c, lab in enumerate(LABELS):
        called, actual = v == c, t == c
        hit = float((called & actual).sum())
        per[lab] = {"precision": round(float(hit / called.sum()), 4) if called.any() else None,
                    "recall": round(float(hit / actual.sum()), 4) if actual.any() else None,
                    "n_called": int(called.sum())}
    return float((v == t).mean()), per


def fit_reliability(name: str, kind: Literal["probs", "label"], probs: np.ndarray, y: np.ndarray,
                    prior: np.ndarray, *, shrinkage: float = 0.5, max_weight: float = 3.0,
                    min_votes: int = 10) -> Reliability:
    """Measure one source on labelled rows: ``probs [N, K]`` (NaN rows: no vote; one-hot for label
    sources), ``y [N]`` the original label indices. Fewer than ``min_votes`` votes: weight 0 (no say)."""
    ok = has_vote(probs) & (y >= 0)
    n = int(ok.sum())
    acc, per = _report(votes_of(probs[ok]), y[ok])
    if n < min_votes:
        return Reliability(name, kind, np.zeros(K) if kind == "probs" else np.full(K, 1.0 / K), n, acc, per,
                           note=f"{n} labelled votes < {min_votes}: no weight", usable=False)
    p, t = probs[ok], y[ok]
    if kind == "label":
        v = p.argmax(axis=1)
        prec = np.array([((v == c) & (t == c)).sum() + 1.0 / K for c in range(K)]) / \
            np.array([(v == c).sum() + 1.0 for c in range(K)])
        return Reliability(name, kind, np.clip(prec, 1e-3, 1 - 1e-3), n, acc, per)
    from scipy.optimize import minimize

    lr = np.log(np.clip(p, PROB_FLOOR, 1.0)) - np.log(prior)[None, :]
    log_prior = np.log(prior)[None, :]
    rows = np.arange(len(t))

    def nll(a: np.ndarray) -> float:
        post = _softmax(a[None, :] * lr + log_prior)
        return float(-np.mean(np.log(post[rows, t] + 1e-12)) + shrinkage * np.mean((a - a.mean()) ** 2))

    res = minimize(nll, np.full(K, 0.5), bounds=[(0.0, max_weight)] * K, method="L-BFGS-B")
    return Reliability(name, kind, np.asarray(res.x, dtype=np.float64), n, acc, per)


def evidence(rel: Reliability, probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``log P(y=c | vote) - log P(y=c)`` of a source's votes, same shape as ``probs`` (``[..., K]``);
    0 where the source has no vote. For probability sources the per-row normaliser is left out (it is the
    same for every class and cancels in the posterior)."""
    ok = has_vote(probs)
    out = np.zeros(probs.shape, dtype=np.float64)
    if not ok.any() or not rel.usable:
        return out
    p = np.nan_to_num(probs[ok], nan=0.0)
    if rel.kind == "probs":
        out[ok] = rel.weight * (np.log(np.clip(p, PROB_FLOOR, 1.0)) - np.log(prior))
        return out
    v = p.argmax(axis=-1)
    r = rel.weight[v][:, None]  # precision of the voted class
    pv = prior[v][:, None]
    other = np.log((1.0 - r) / np.clip(1.0 - pv, 1e-9, None))
    e = np.repeat(other, K, axis=1)
    e[np.arange(len(v)), v] = np.log(r[:, 0] / pv[:, 0])
    out[ok] = e
    return out


def annotation_reliability(accuracy: float) -> Reliability:
    """The original annotation as a label source of precision ``accuracy`` for every class."""
    return Reliability("original", "label", np.full(K, float(np.clip(accuracy, 1e-3, 1 - 1e-3))),
                       note="relabel.annotation_accuracy (a prior, not measured)")


def posterior(evidences: list[np.ndarray], prior: np.ndarray) -> np.ndarray:
    """Posterior over the labels from summed evidence (``[..., K]`` each) and the class prior."""
    total = np.log(prior) + sum(evidences, np.zeros_like(evidences[0]) if evidences else 0.0)
    return _softmax(np.asarray(total, dtype=np.float64))


def one_hot(labels: list[str | None]) -> np.ndarray:
    """Label votes → ``[N, K]`` one-hot rows (NaN rows where there is no vote). Unknown labels raise."""
    index = {lab: k for k, lab in enumerate(LABELS)}
    out = np.full((len(labels), K), np.nan)
    for i, lab in enumerate(labels):
        if lab is None or str(lab).strip() == "":
            continue
        key = str(lab).strip().lower()
        if key not in index:
            raise ValueError(f"unknown label {lab!r}")
        out[i] = 0.0
        out[i, index[key]] = 1.0
    return out
