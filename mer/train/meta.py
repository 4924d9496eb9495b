"""The stacking meta-learner (the math of :mod:`mer.train.stack`, without run directories): fitting, nested-CV
choice, application per fold, and the loaded stacked run that :func:`mer.train.ensemble.load_ensemble` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mer.evaluation.metrics import weighted_f1
from mer.train.features import table_inputs
from mer.train.members import MemberRuns

# The meta-learner candidates nested CV chooses from: (kind, regularisation). wavg: L2 on the member logits of
# the class-wise weights (towards equal weights); logreg: scikit-learn's inverse strength C.
META_CANDIDATES: tuple[tuple[str, float], ...] = (("wavg", 0.01), ("logreg", 0.03), ("logreg", 0.3), ("logreg", 3.0))
EPS = 1e-6


# ------------------------------------------------------------------------------------------ meta-learners
def _features(probs: list[np.ndarray]) -> np.ndarray:
    """[N, J, C] member probabilities (clipped, renormalised)."""
    p = np.clip(np.stack(probs, axis=1).astype(np.float64), EPS, 1.0)
    return p / p.sum(axis=2, keepdims=True)


def fit_meta(kind: str, reg: float, p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fit one meta-learner on member probabilities ``p`` [N, J, C] and labels ``y``; JSON-able parameters."""
    n, j, c = p.shape
    if kind == "wavg":
        import torch

        pt, yt = torch.from_numpy(p), torch.from_numpy(y)
        theta = torch.zeros(j, c, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=60, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            a = torch.softmax(theta, dim=0)                       # [J, C]: per class, weights over members
            s = (pt * a.unsqueeze(0)).sum(dim=1)                 # [N, C]
            logp = torch.log(s / s.sum(dim=1, keepdim=True))
            loss = torch.nn.functional.nll_loss(logp, yt) + reg * (theta ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return {"kind": "wavg", "reg": reg, "theta": theta.detach().numpy().tolist()}
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        present = sorted(set(y.tolist()))
        if len(present) < 2 and present:  # a degenerate training set: predict its one class
            return {"kind": "const", "reg": reg, "probs": np.eye(c)[present[0]].tolist()}
        lr = LogisticRegression(C=reg, max_iter=500)
        lr.fit(np.log(p).reshape(n, j * c), y)
        coef = np.zeros((c, j * c))
        intercept = np.full(c, -30.0)  # classes never seen in training: never predicted
        coef[lr.classes_] = lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_, lr.coef_])
        intercept[lr.classes_] = lr.intercept_ if len(lr.classes_) > 2 else np.array([-lr.intercept_[0],
                                                                                      lr.intercept_[0]])
        return {"kind": "logreg", "reg": reg, "coef": coef.tolist(), "intercept": intercept.tolist()}
    raise ValueError(f"unknown meta-learner {kind!r}")


def apply_meta(meta: dict[str, Any], p: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] of a fitted meta-learner on member probabilities ``p`` [N, J, C]."""
    n, j, c = p.shape
    if meta["kind"] == "wavg":
        theta = np.asarray(meta["theta"], np.float64)
        a = np.exp(theta - theta.max(axis=0, keepdims=True))
        a /= a.sum(axis=0, keepdims=True)
        s = (p * a[None]).sum(axis=1)
        return s / s.sum(axis=1, keepdims=True)
    if meta["kind"] == "logreg":
        z = np.log(p).reshape(n, j * c) @ np.asarray(meta["coef"]).T + np.asarray(meta["intercept"])
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    if meta["kind"] == "const":
        return np.tile(np.asarray(meta["probs"], np.float64), (n, 1))
    raise ValueError(f"unknown meta-learner {meta['kind']!r}")


def choose_meta(p: np.ndarray, y: np.ndarray, fold_of: np.ndarray,
                candidates: tuple[tuple[str, float], ...] = META_CANDIDATES) -> tuple[tuple[str, float], dict]:
    """The candidate with the best leave-one-fold-out WAF over the folds of these rows (ties: the earlier,
    simpler one), and every candidate's figure. Rows of one fold only (2-fold outer CV) are split in two,
    stratified and seeded, for the comparison."""
    folds = sorted(set(fold_of.tolist()))
    if len(folds) < 2:
        fold_of = _halves(y)
        folds = [0, 1]
    scores: dict[str, float] = {}
    best, best_waf = candidates[0], -1.0
    for cand in candidates:
        pred = np.zeros(len(y), np.int64)
        for k in folds:
            tr, va = fold_of != k, fold_of == k
            pred[va] = apply_meta(fit_meta(*cand, p[tr], y[tr]), p[va]).argmax(axis=1)
        waf = weighted_f1(y, pred)
        scores[f"{cand[0]}:{cand[1]:g}"] = waf
        if waf > best_waf + 1e-9:
            best, best_waf = cand, waf
    return best, scores


def _halves(y: np.ndarray) -> np.ndarray:
    """A stratified, seeded split of the rows in two (fold 0/1): per class, alternate rows of a fixed shuffle."""
    out = np.zeros(len(y), np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    for k in np.unique(y):
        rows = order[y[order] == k]
        out[rows[1::2]] = 1
    return out


@dataclass
class StackFit:
    """Nested-CV stacking of member out-of-fold probabilities: per fold, the meta-learner that predicts it."""

    metas: dict[int, dict[str, Any]]
    oof_probs: np.ndarray  # [N, C]: row i by the meta-learner of its fold (which never saw that fold)
    fold_of: np.ndarray

    def waf(self, y: np.ndarray) -> float:
        return weighted_f1(y, self.oof_probs.argmax(axis=1))


def fit_stack(member_probs: list[np.ndarray], y: np.ndarray, fold_of: np.ndarray,
              member_present: list[np.ndarray] | None = None) -> StackFit:
    """Nested CV (module docstring): ``member_probs`` are the members' out-of-fold probabilities [N, C] of the
    labelled rows ``y`` (fold ``fold_of``); ``member_present`` [N] bool per member: whether the member saw any
    of its modalities on the row (else it votes uniform)."""
    probs = [np.where(pres[:, None], pr, 1.0 / pr.shape[1]) if pres is not None else pr
             for pr, pres in zip(member_probs, member_present or [None] * len(member_probs))]
    p = _features(probs)
    y = np.asarray(y, np.int64)
    fold_of = np.asarray(fold_of)
    oof = np.zeros((len(y), p.shape[2]), np.float64)
    metas: dict[int, dict[str, Any]] = {}
    for k in sorted(set(fold_of.tolist())):
        tr, va = fold_of != k, fold_of == k
        (kind, reg), inner = choose_meta(p[tr], y[tr], fold_of[tr])
        meta = fit_meta(kind, reg, p[tr], y[tr])
        meta["inner_waf"] = inner
        metas[int(k)] = meta
        oof[va] = apply_meta(meta, p[va])
    return StackFit(metas=metas, oof_probs=oof.astype(np.float32), fold_of=fold_of)


def stack_fold_probs(metas: dict[int, dict[str, Any]], folds: list[int], member_fold_probs: list[np.ndarray],
                     member_present: list[np.ndarray]) -> np.ndarray:
    """[N, F, C]: fold k's meta-learner on the members' fold-k probabilities (new rows: scoring)."""
    n, f, c = member_fold_probs[0].shape
    out = np.zeros((n, f, c), np.float32)
    for i, k in enumerate(folds):
        probs = [np.where(pres[:, None], mp[:, i], 1.0 / c) for mp, pres in zip(member_fold_probs, member_present)]
        out[:, i] = apply_meta(metas[k], _features(probs))
    return out


@dataclass
class StackedEnsemble(MemberRuns):
    """A stacked run loaded for scoring (same interface as :class:`mer.train.ensemble.Ensemble`)."""

    metas: dict[int, dict[str, Any]]

    def predict(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [N, folds, 6], modality weights [N, folds, M])``; the weights are the members' (each
        modality's weight averaged over the members that read it)."""
        mods = self.modalities
        fold_probs, present = [], []
        n, f = table.num_rows, len(self.folds)
        mod_w = np.zeros((n, f, len(mods)), np.float64)
        mod_n = np.zeros((n, 1, len(mods)), np.float64)
        for member in self.members:
            _, mask = table_inputs(table, member.modalities, member.dims)
            p, mw = member.predict(table)
            fold_probs.append(p)
            present.append(mask.any(axis=1))
            cols = [mods.index(m) for m in member.modalities]
            say = mask.any(axis=1).astype(np.float64)[:, None, None]
            mod_w[:, :, cols] += say * mw
            mod_n[:, :, cols] += say
        probs = stack_fold_probs(self.metas, self.folds, fold_probs, present)
        return probs, np.divide(mod_w, mod_n, out=np.zeros_like(mod_w), where=mod_n > 0).astype(np.float32)

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        return self.predict(table)[0]


