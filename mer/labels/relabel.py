"""Multi-source label refinement (ECMF): keep, relabel or down-weight noisy training labels.

Independent sources vote on every labelled training clip: the out-of-fold predictions of each single-modality
run and of the fused run, an LLM's vote, any external table (:mod:`mer.labels.sources`). Each source's
reliability is measured per class on the labelled rows (:mod:`mer.labels.evidence`) and weights its vote; the
original annotation is one more source, of precision ``relabel.annotation_accuracy``. Their combined
posterior decides, in order:

1. ``no_votes``   — no source has a vote for this clip: keep, weight 1.
2. ``relabel``    — only with ``relabel.mode: relabel``: another label has posterior ≥ ``relabel.min_posterior``
                    *and* at least ``relabel.min_agree`` sources vote for it themselves (one confident model is
                    not enough): the label changes, weight = its posterior. By default (``mode: weight``) no label
                    changes and such a clip falls to the next rule: where the sources are weak their alternative
                    is more often their own confusion than the truth, and a wrong relabel teaches the wrong class
                    at full strength where a down-weighted label only pulls less.
3. ``downweight`` — the original label's posterior is below ``relabel.keep_min_posterior``: keep it with
                    weight = that posterior (at least ``relabel.min_weight``), so a probably wrong label
                    pulls less.
4. ``agree``      — the sources' own consensus (without the annotation) is the original label: weight 1.
5. ``uncertain``  — the sources lean elsewhere but the original stays likely: weight 1.

The output is a label table (``clip_id, label, weight, source``) that training accepts, with provenance per
row (original label, rule, posteriors, every source's vote) and, beside it, each source's measured
reliability (``<table>.reliability.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, LabelsConfig, MerConfig, RelabelConfig
from mer.labels.evidence import (Reliability, annotation_reliability, class_prior, evidence, fit_reliability,
                                 posterior, votes_of)
from mer.labels.sources import SourceVotes, read_source, run_oof_votes
from mer.store import storage
from mer.store.parts import PartStore, read_parts
from mer.train.features import label_index

REFINED_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("label", pa.string()), ("weight", pa.float32()), ("source", pa.string()),
    ("original_label", pa.string()), ("rule", pa.string()), ("posterior", pa.float32()),
    ("posterior_original", pa.float32()), ("consensus_label", pa.string()), ("n_agree", pa.int32()),
    ("votes", pa.string()),
])


def fit_sources(sources: list[SourceVotes], ids: list[str], y: np.ndarray, prior: np.ndarray,
                lc: LabelsConfig) -> dict[str, Reliability]:
    """Each source's reliability measured on the labelled rows ``ids`` (original label indices ``y``)."""
    return {s.name: fit_reliability(s.name, s.kind, s.rows(ids), y, prior, shrinkage=lc.reliability_shrinkage,
                                    max_weight=lc.reliability_max_weight, min_votes=lc.min_labelled_votes)
            for s in sources}


def votes_json(names: list[str], probs: list[np.ndarray], i: int) -> str:
    """Row ``i``'s votes as ``{source: [label, probability]}`` (sources without a vote left out)."""
    out: dict[str, Any] = {}
    for name, p in zip(names, probs):
        row = p[i]
        if np.isfinite(row).all() and row.sum() > 0:
            k = int(np.argmax(row))
            out[name] = [LABELS[k], round(float(row[k]), 4)]
    return json.dumps(out, sort_keys=True)


def refine_labels(original: pa.Table, sources: list[SourceVotes], rc: RelabelConfig, lc: LabelsConfig,
                  rel: dict[str, Reliability] | None = None) -> tuple[pa.Table, dict[str, Reliability]]:
    """Apply the refinement rules to ``original`` (``clip_id, label``) given the sources' votes.

    Returns the refined table (:data:`REFINED_SCHEMA`, one row per input row) and the reliabilities used:
    ``rel`` when given (measured elsewhere, e.g. on out-of-fold votes when these votes are not), else
    measured on these votes. Unknown original labels fail naming the clip.
    """
    ids = [str(c) for c in original.column("clip_id").to_pylist()]
    labels = original.column("label").to_pylist()
    y = label_index(labels)
    bad = [(c, lab) for c, lab, k in zip(ids, labels, y) if k < 0]
    if bad:
        raise ValueError(f"original labels: clip {bad[0][0]!r} has unknown label {bad[0][1]!r} "
                         f"({len(bad)} such rows)")
    prior = class_prior(y)
    if rel is None:
        rel = fit_sources(sources, ids, y, prior, lc)
    names = [s.name for s in sources]
    probs = [s.rows(ids) for s in sources]
    ev = [evidence(rel[s.name], p, prior) for s, p in zip(sources, probs)]
    # Sources whose reliability could not be measured neither vote nor count towards agreement.
    votes = (np.stack([votes_of(p) if rel[s.name].usable else np.full(len(ids), -1) for s, p in zip(sources, probs)],
                      axis=1) if probs else np.zeros((len(ids), 0), int))
    post_sources = posterior(ev, prior) if ev else np.tile(prior, (len(ids), 1))
    onehot = np.zeros((len(ids), len(LABELS)))
    onehot[np.arange(len(ids)), y] = 1.0
    post = posterior([*ev, evidence(annotation_reliability(rc.annotation_accuracy), onehot, prior)], prior)

    rows: dict[str, list] = {f.name: [] for f in REFINED_SCHEMA}
    for i, cid in enumerate(ids):
        o = int(y[i])
        has_votes = bool((votes[i] >= 0).any())
        alt_post = post[i].copy()
        alt_post[o] = -1.0
        alt = int(np.argmax(alt_post))
        n_alt = int((votes[i] == alt).sum())
        consensus = int(np.argmax(post_sources[i]))
        label, weight, rule = o, 1.0, "no_votes"
        if has_votes:
            if rc.mode == "relabel" and post[i, alt] >= rc.min_posterior and n_alt >= rc.min_agree:
                label, weight, rule = alt, float(post[i, alt]), "relabel"
            elif post[i, o] < rc.keep_min_posterior:
                weight, rule = max(float(post[i, o]), rc.min_weight), "downweight"
            elif consensus == o:
                rule = "agree"
            else:
                rule = "uncertain"
        rows["clip_id"].append(cid)
        rows["label"].append(LABELS[label])
        rows["weight"].append(weight)
        rows["source"].append("refined" if rule == "relabel" else "original")
        rows["original_label"].append(LABELS[o])
        rows["rule"].append(rule)
        rows["posterior"].append(float(post[i, label]))
        rows["posterior_original"].append(float(post[i, o]))
        rows["consensus_label"].append(LABELS[consensus] if has_votes else None)
        rows["n_agree"].append(int((votes[i] == label).sum()))
        rows["votes"].append(votes_json(names, probs, i))
    return pa.table(rows, schema=REFINED_SCHEMA), rel


def refine_labels_per_fold(original: pa.Table, sources: list[SourceVotes], rel: dict[str, Reliability],
                           rc: RelabelConfig, lc: LabelsConfig, folds: int) -> pa.Table:
    """The refinement decided once per fold: fold ``k``'s rows (``fold`` = k) take the votes of fold ``k``'s
    models only (a per-fold source's ``[N, F, K]`` slice ``k``; fold-free tables as they are).

    Why: fold ``k``'s model is judged on fold ``k``'s original labels (the gate). Out-of-fold votes on a row of
    fold ``j`` come from fold ``j``'s model, which trained on fold ``k``; labels refined by them distil fold
    ``k``'s labels into the model judged on them, and the gate then credits the refinement with its own leak
    (measured: gate +0.03 while the test split fell −0.01). Fold ``k``'s models never saw fold ``k``: their
    votes on the other folds' rows are in-sample (they trained on those rows' original labels, so they vote
    for them more often — a refinement that changes less), and on fold ``k``'s rows out-of-fold. ``rel``: the
    sources' reliabilities measured on out-of-fold votes (in-sample votes would overstate them)."""
    parts = []
    for k in range(folds):
        votes = [SourceVotes(s.name, s.kind, s.ids, s.probs[:, k, :]) if s.per_fold else s for s in sources]
        t, _ = refine_labels(original, votes, rc, lc, rel=rel)
        parts.append(t.append_column("fold", pa.array(np.full(t.num_rows, k, np.int32))))
    return pa.concat_tables(parts)


def table_folds(table: pa.Table) -> int:
    """How many folds a label table decides separately (1: one decision per clip for every fold)."""
    if "fold" not in table.column_names:
        return 1
    return max(1, len({f for f in table.column("fold").to_pylist() if f is not None}))


def rule_counts(table: pa.Table) -> dict[str, int]:
    """How many clips each rule decided (a per-fold table: per fold, the mean over its folds, rounded)."""
    n = table_folds(table)
    return {rule: round(c / n) for rule, c in Counter(table.column("rule").to_pylist()).items()}


def train_labels(features: str | PartStore) -> pa.Table:
    """The original labels of the ``train`` split of a feature store (clip_id, label)."""
    t = read_parts(features, columns=["split", "label"])
    mask = [s == "train" and lab is not None for s, lab in zip(t.column("split").to_pylist(),
                                                              t.column("label").to_pylist())]
    return t.filter(pa.array(mask)).select(["clip_id", "label"])


def reliability_uri(label_table_uri: str) -> str:
    """Where the reliabilities behind a label table are written: ``<table stem>.reliability.json``."""
    stem = label_table_uri[:-len(".parquet")] if label_table_uri.endswith(".parquet") else label_table_uri
    return f"{stem}.reliability.json"


def write_label_table(uri: str, table: pa.Table, rel: dict[str, Reliability], extra: dict | None = None) -> None:
    """Write a label table and, beside it, the reliabilities of the sources that shaped it."""
    storage.write_table(uri, table)
    storage.write_json(reliability_uri(uri), {"sources": [r.to_json() for r in rel.values()], **(extra or {})})


def relabel_run(cfg: MerConfig, features_uri: str, out_uri: str, *, runs: dict[str, str] | None = None,
                tables: dict[str, str] | None = None) -> dict:
    """Refine the train labels of ``features_uri`` with the OOF predictions of ``runs`` ({name: run dir})
    and the vote tables ``tables`` ({name: uri}); write the label table to ``out_uri`` and return a summary."""
    sources = [run_oof_votes(n, u) for n, u in (runs or {}).items()]
    sources += [read_source(n, u) for n, u in (tables or {}).items()]
    if not sources:
        raise ValueError("relabel: give at least one source (a run's OOF predictions or a vote table)")
    refined, rel = refine_labels(train_labels(features_uri), sources, cfg.relabel, cfg.labels)
    write_label_table(out_uri, refined, rel)
    return {"out": out_uri, "rows": refined.num_rows, "rules": rule_counts(refined), "sources": sorted(rel),
            "reliability": reliability_uri(out_uri)}
