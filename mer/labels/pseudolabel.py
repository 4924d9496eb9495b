"""Agreement-based, class-balanced pseudo-labels of the unlabelled pool, chosen fold by fold.

The rule behind the strongest MER-SEMI pseudo-labelling results: a pool clip becomes a pseudo-label only when
the fused model and independent views (single-modality models, an LLM vote, other tables) agree. Here, for
fold ``k`` of the next training run, a pool clip qualifies when

- fold ``k``'s fused model has a vote (the clip has features) with confidence ≥ ``pseudolabel.min_confidence``;
- the posterior that combines every source's reliability-weighted vote (:mod:`mer.labels.evidence`) names
  the same label;
- at least ``pseudolabel.min_agree`` other sources vote for that label themselves;
- that posterior is ≥ ``pseudolabel.min_posterior``.

Qualified clips are ranked by posterior within each label, and each label takes at most its share (the
labelled class prior) of ``k_fraction * k_growth^(round-1) * labelled rows``: rounds grow k, and one easy
class cannot swamp the training set. A pseudo-label's sample weight is ``pseudolabel.weight`` × its posterior.

Why per fold: fold ``k``'s pseudo-labels come only from fold ``k``'s models (of the fused run and of every
single-modality run), which never trained on fold ``k``'s labelled rows, so the out-of-fold WAF that gates
each stage (:mod:`mer.labels.gate`) is never measured on rows that reached training through a pseudo-label.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PseudoLabelConfig
from mer.labels.evidence import Reliability, evidence, posterior, votes_of
from mer.labels.relabel import votes_json
from mer.labels.sources import SourceVotes

LABEL_TABLE_SCHEMA = pa.schema([("clip_id", pa.string()), ("label", pa.string()), ("weight", pa.float32()),
                                ("source", pa.string()), ("fold", pa.int32())])
SELECTION_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("fold", pa.int32()), ("pred_label", pa.string()),
    ("fused_confidence", pa.float32()), ("posterior", pa.float32()), ("n_agree", pa.int32()),
    ("selected", pa.bool_()), ("reason", pa.string()), ("weight", pa.float32()), ("votes", pa.string()),
])


def round_quota(pc: PseudoLabelConfig, round_no: int, n_labelled: int, prior: np.ndarray) -> np.ndarray:
    """Per-label cap for one fold in round ``round_no`` (1-based): the round's k split by the class prior."""
    k_total = pc.k_fraction * pc.k_growth ** (round_no - 1) * n_labelled
    return np.array([math.ceil(k_total * p) for p in prior], dtype=np.int64)


def select_pseudo_labels(ids: list[str], fused: SourceVotes, others: list[SourceVotes],
                         rel: dict[str, Reliability], prior: np.ndarray, quota: np.ndarray,
                         pc: PseudoLabelConfig) -> pa.Table:
    """One row per (pool clip, fold) saying whether it is picked for that fold and why (``reason``).

    ``fused`` holds the current fused run's per-fold pool probabilities; ``others`` the other sources
    (per-fold runs, or fold-free tables repeated over folds); ``rel`` every source's reliability.
    """
    folds = fused.probs.shape[1]
    n = len(ids)
    fp = fused.rows(ids)  # [N, F, K]
    other_p = [s.rows(ids, folds=folds) for s in others]
    names = [fused.name] + [s.name for s in others]
    cols: dict[str, list] = {f.name: [] for f in SELECTION_SCHEMA}
    for k in range(folds):
        ev = [evidence(rel[fused.name], fp[:, k], prior)]
        ev += [evidence(rel[s.name], p[:, k], prior) for s, p in zip(others, other_p)]
        post = posterior(ev, prior)
        fv = votes_of(fp[:, k])
        conf = np.where(fv >= 0, np.nan_to_num(fp[:, k]).max(axis=1), np.nan)
        agree = np.zeros(n, dtype=np.int64)
        for p in other_p:
            agree += (votes_of(p[:, k]) == fv) & (fv >= 0)
        p_lab = np.where(fv >= 0, post[np.arange(n), np.maximum(fv, 0)], np.nan)
        reason = np.full(n, "", dtype=object)
        reason[fv < 0] = "no fused vote (no features)"
        todo = reason == ""
        low_conf = todo & (conf < pc.min_confidence)
        reason[low_conf] = "low fused confidence"
        todo &= ~low_conf
        mismatch = todo & (post.argmax(axis=1) != fv)
        reason[mismatch] = [f"posterior prefers {LABELS[j]}" for j in post.argmax(axis=1)[mismatch]]
        todo &= ~mismatch
        few = todo & (agree < pc.min_agree)
        reason[few] = "too few sources agree"
        todo &= ~few
        low = todo & (p_lab < pc.min_posterior)
        reason[low] = "low posterior"
        todo &= ~low
        selected = np.zeros(n, dtype=bool)
        for c in range(len(LABELS)):
            cand = np.flatnonzero(todo & (fv == c))
            cand = cand[np.argsort(-p_lab[cand], kind="stable")]
            selected[cand[:quota[c]]] = True
            reason[cand[quota[c]:]] = "class quota"
        reason[selected] = "selected"
        probs_k = [fp[:, k]] + [p[:, k] for p in other_p]
        for i in range(n):
            cols["clip_id"].append(ids[i])
            cols["fold"].append(k)
            cols["pred_label"].append(LABELS[fv[i]] if fv[i] >= 0 else None)
            cols["fused_confidence"].append(None if np.isnan(conf[i]) else float(conf[i]))
            cols["posterior"].append(None if np.isnan(p_lab[i]) else float(p_lab[i]))
            cols["n_agree"].append(int(agree[i]))
            cols["selected"].append(bool(selected[i]))
            cols["reason"].append(str(reason[i]))
            cols["weight"].append(float(pc.weight * p_lab[i]) if selected[i] else None)
            cols["votes"].append(votes_json(names, probs_k, i))
    return pa.table(cols, schema=SELECTION_SCHEMA)


def build_label_table(base: pa.Table, selection: pa.Table) -> pa.Table:
    """Base labels (original/refined: every fold, or per fold) plus the selected pseudo-labels
    (``source=pseudo``, their fold). A clip of the base table never gets a pseudo-label on top."""
    n = base.num_rows
    if "weight" not in base.column_names:
        base = base.append_column("weight", pa.array(np.ones(n, dtype=np.float32)))
    if "source" not in base.column_names:
        base = base.append_column("source", pa.array(["original"] * n))
    # A per-fold base (the refinement decides each fold's labels) keeps its folds.
    fold = base.column("fold").cast(pa.int32()) if "fold" in base.column_names else pa.nulls(n, pa.int32())
    base = base.select(["clip_id", "label", "weight", "source"]).append_column("fold", fold)
    base = base.cast(LABEL_TABLE_SCHEMA)
    base_ids = set(base.column("clip_id").to_pylist())
    sel = selection.filter(selection.column("selected"))
    sel = sel.filter(pa.array([c not in base_ids for c in sel.column("clip_id").to_pylist()], pa.bool_()))
    pseudo = pa.table({"clip_id": sel.column("clip_id"), "label": sel.column("pred_label"),
                       "weight": sel.column("weight"), "source": pa.array(["pseudo"] * sel.num_rows, pa.string()),
                       "fold": sel.column("fold")}, schema=LABEL_TABLE_SCHEMA)
    return pa.concat_tables([base, pseudo])


def selection_summary(selection: pa.Table) -> dict:
    """Selected pseudo-labels per fold and per label, distinct clips, and why the others were not taken."""
    picked = selection.filter(selection.column("selected"))
    return {"selected": picked.num_rows,
            "distinct_clips": len(set(picked.column("clip_id").to_pylist())),
            "per_fold": dict(sorted(Counter(picked.column("fold").to_pylist()).items())),
            "per_class": {lab: picked.column("pred_label").to_pylist().count(lab) for lab in LABELS},
            "reasons": dict(Counter(r if not r.startswith("posterior prefers") else "posterior prefers another"
                                    for r in selection.column("reason").to_pylist()))}

