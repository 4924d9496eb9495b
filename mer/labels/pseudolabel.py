"""Semi-supervised pseudo-labelling: rounds of train → score the unlabelled pool → select → retrain.

Round ``r`` lives in ``<out>/round_<r>/``: ``scores/`` (the pool scored by round r-1's fold ensemble, a Ray
Data actor-pool job), ``selection.parquet`` (every candidate with its scores and whether/why it was picked),
``labels.parquet`` (the label table training reads) and ``run/`` (the retrained model). A round is finished
when its ``done.json`` exists; re-running skips finished rounds and resumes the unfinished one (scoring and
training are resumable themselves).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from mer import storage
from mer.config import LABELS, MerConfig, PseudoLabelConfig
from mer.extract.store import read_features
from mer.labels.relabel import train_labels

log = logging.getLogger("mer.pseudolabel")

LABEL_TABLE_SCHEMA = pa.schema([("clip_id", pa.string()), ("label", pa.string()), ("weight", pa.float32()),
                                ("source", pa.string())])


def select_pseudo_labels(scores: pa.Table, cfg: PseudoLabelConfig) -> pa.Table:
    """Mark which scored pool clips become pseudo-labels.

    A clip qualifies when it was scored (status ok), its ensemble confidence is ≥ ``min_confidence`` and at
    least ``min_fold_agreement`` of the folds agree with the ensemble's label. Per-class caps (the tighter of
    ``max_per_class`` and ``max_fraction_per_class`` × qualified clips, most confident first) stop one easy
    class from swamping the training set. Returns the scores with ``selected`` and ``reason`` columns.
    """
    n = scores.num_rows
    status = scores.column("status").to_pylist()
    conf = np.nan_to_num(np.asarray(scores.column("confidence").to_numpy(zero_copy_only=False), dtype=float), nan=-1)
    agree = np.nan_to_num(np.asarray(scores.column("fold_agreement").to_numpy(zero_copy_only=False), dtype=float),
                          nan=-1)
    pred = scores.column("pred_label").to_pylist()
    reason = ["" for _ in range(n)]
    qualified = []
    for i in range(n):
        if status[i] != "ok" or pred[i] is None:
            reason[i] = f"not scored ({status[i]})"
        elif conf[i] < cfg.min_confidence:
            reason[i] = "low confidence"
        elif agree[i] < cfg.min_fold_agreement:
            reason[i] = "folds disagree"
        else:
            qualified.append(i)
    cap = math.ceil(cfg.max_fraction_per_class * len(qualified)) if qualified else 0
    if cfg.max_per_class is not None:
        cap = min(cap, cfg.max_per_class)
    selected = np.zeros(n, dtype=bool)
    taken = {lab: 0 for lab in LABELS}
    for i in sorted(qualified, key=lambda i: -conf[i]):
        if taken[pred[i]] < cap:
            taken[pred[i]] += 1
            selected[i] = True
            reason[i] = "selected"
        else:
            reason[i] = "class cap"
    return scores.append_column("selected", pa.array(selected)).append_column("reason", pa.array(reason))


def build_label_table(base: pa.Table, selection: pa.Table, weight: float) -> pa.Table:
    """Base labels (original/refined) plus the selected pseudo-labels (``source=pseudo``)."""
    if "weight" not in base.column_names:
        base = base.append_column("weight", pa.array(np.ones(base.num_rows, dtype=np.float32)))
    if "source" not in base.column_names:
        base = base.append_column("source", pa.array(["original"] * base.num_rows))
    base = base.select(["clip_id", "label", "weight", "source"]).cast(LABEL_TABLE_SCHEMA)
    sel = selection.filter(selection.column("selected"))
    base_ids = set(base.column("clip_id").to_pylist())
    keep = [cid not in base_ids for cid in sel.column("clip_id").to_pylist()]
    sel = sel.filter(pa.array(keep, type=pa.bool_()))
    conf = np.asarray(sel.column("confidence").to_numpy(zero_copy_only=False), dtype=np.float32)
    pseudo = pa.table({"clip_id": sel.column("clip_id"), "label": sel.column("pred_label"),
                       "weight": pa.array(weight * conf, pa.float32()),
                       "source": pa.array(["pseudo"] * sel.num_rows, pa.string())}, schema=LABEL_TABLE_SCHEMA)
    return pa.concat_tables([base, pseudo])


def pseudolabel_rounds(cfg: MerConfig, features_uri: str, out_uri: str, *, base_run: str | None = None,
                       labels_uri: str | None = None, rounds: int | None = None) -> dict:
    """Run (or resume) ``rounds`` of pseudo-labelling; returns per-round summaries.

    ``base_run`` is a finished training run used as round 0; without it round 0 is trained here on
    ``labels_uri`` (or the store's train labels). ``labels_uri`` (e.g. refined labels) is the base label
    table every round adds its pseudo-labels to.
    """
    from mer.score import score_features
    from mer.train import train_run

    n_rounds = rounds or cfg.pseudolabel.rounds
    base = storage.read_table(labels_uri) if labels_uri else train_labels(features_uri)
    prev_run = base_run
    if prev_run is None:
        prev_run = storage.join(out_uri, "round_0", "run")
        train_run(cfg, features_uri, prev_run, resume=True, labels_uri=labels_uri)
    summaries: list[dict[str, Any]] = []
    for r in range(1, n_rounds + 1):
        rdir = storage.join(out_uri, f"round_{r}")
        done_uri = storage.join(rdir, "done.json")
        run_uri = storage.join(rdir, "run")
        if storage.exists(done_uri):
            summaries.append(storage.read_json(done_uri))
            prev_run = run_uri
            continue
        scores_dir = storage.join(rdir, "scores")
        score_features(cfg, prev_run, features_uri, scores_dir, splits=["unlabeled"])
        selection = select_pseudo_labels(read_features(scores_dir), cfg.pseudolabel)
        storage.write_table(storage.join(rdir, "selection.parquet"), selection)
        table = build_label_table(base, selection, cfg.pseudolabel.weight)
        round_labels = storage.join(rdir, "labels.parquet")
        storage.write_table(round_labels, table)
        metrics = train_run(cfg, features_uri, run_uri, resume=True, labels_uri=round_labels)
        picked = selection.filter(selection.column("selected"))
        per_class = {lab: 0 for lab in LABELS}
        for lab in picked.column("pred_label").to_pylist():
            per_class[lab] += 1
        summary = {"round": r, "run": run_uri, "scored": selection.num_rows, "selected": picked.num_rows,
                   "selected_per_class": per_class, "metrics": _headline(metrics)}
        storage.write_json(done_uri, summary)
        summaries.append(summary)
        prev_run = run_uri
    return {"out": out_uri, "final_run": prev_run, "rounds": summaries}


def _headline(metrics: dict) -> dict:
    keep = {k: metrics[k] for k in ("waf", "accuracy") if k in metrics}
    if isinstance(metrics.get("test"), dict):
        keep["test"] = {k: metrics["test"].get(k) for k in ("waf", "accuracy")}
    return keep
