"""``mer ensemble``: several finished runs as one run directory (soft voting of their fold ensembles).

Layout of ``out_uri``: ``models/model.json`` (the members, their weights, the union of their modalities),
``members/<i>_<name>/`` (each member's ``models/`` and ``metrics.json``: the directory is self-contained),
``metrics.json``, ``oof.parquet``, ``test_predictions.parquet``. ``mer score --run`` accepts it.

Fold k of the ensemble is the weighted mean of the members' fold-k models, so members must share their folds
(same store, ``train.folds`` and ``train.seed``); its out-of-fold predictions then stay out of fold.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS
from mer.evaluation.metrics import accuracy, weighted_f1
from mer.runs.layout import best_run, common_store, model_file, run_record
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.ensemble import load_ensemble
from mer.train.features import LABEL_INDEX
from mer.train.results import prediction_table
from mer.train.run import score_split

log = logging.getLogger("mer.ensemble")

Weighting = Literal["mean", "waf"]


def _fold_map(run_uri: str) -> dict[str, int]:
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"), columns=["clip_id", "fold"])
    return dict(zip(oof.column("clip_id").to_pylist(), oof.column("fold").to_pylist()))


def build_ensemble(run_uris: list[str], out_uri: str, weighting: Weighting = "waf",
                   names: list[str] | None = None) -> dict[str, Any]:
    """Write the ensemble of ``run_uris`` (training runs or label-loop directories) to ``out_uri``; returns its
    metrics. ``weighting``: ``mean`` (every run alike) or ``waf`` (each run by its mean fold validation WAF);
    ``names``: the members' names (default: their directory names)."""
    if len(run_uris) < 2:
        raise ValueError("mer ensemble: give at least two runs")
    runs = [best_run(u)[0] for u in run_uris]
    metrics = [storage.read_json(storage.join(r, "metrics.json")) for r in runs]
    features_uri = common_store(runs, "mer ensemble")
    folds = [_fold_map(r) for r in runs]
    for r, f in zip(runs[1:], folds[1:]):
        if f != folds[0]:
            raise ValueError(f"mer ensemble: run {r} drew other folds than {runs[0]} (train.folds / train.seed / "
                             "label rows differ); fold ensembles can only be combined over the same folds")
    members = []
    for i, (r, m) in enumerate(zip(runs, metrics)):
        name = f"{i}_{names[i] if names else r.rstrip('/').rsplit('/', 1)[-1]}"
        storage.copy_dir(storage.join(r, "models"), storage.join(out_uri, "members", name, "models"))
        storage.write_json(storage.join(out_uri, "members", name, "metrics.json"), m)
        weight = 1.0 if weighting == "mean" else float(m["cv_waf_mean"])
        members.append({"name": name, "path": f"members/{name}", "run": r, "weight": weight,
                        "cv_waf_mean": m["cv_waf_mean"], "oof_waf": m["waf"],
                        "test_waf": (m.get("test") or {}).get("waf"), "modalities": m["modalities"]})
    mods = list(dict.fromkeys(mod for m in metrics for mod in m["modalities"]))
    spec = {"members": members, "weighting": weighting, "modalities": mods, "labels": list(LABELS)}
    # The training store's provenance (one store, so one record): scoring checks a store's config hash against
    # it, and `mer score --manifest` extracts with its settings, as for a single run.
    recorded = run_record(runs[0])
    if recorded is not None:
        spec["features"] = recorded
    storage.write_json(model_file(out_uri), spec)

    ens = load_ensemble(out_uri)
    store = PartStore(features_uri)  # read twice below (out of fold, test split): listed once
    oof = _oof(ens, store, folds[0])
    storage.write_table(storage.join(out_uri, "oof.parquet"), oof["table"])
    out: dict[str, Any] = {"model": "ensemble", "weighting": weighting, "members": members, "modalities": mods,
                           "waf": oof["waf"], "accuracy": oof["accuracy"], "features": features_uri,
                           "run_name": out_uri.rstrip("/").rsplit("/", 1)[-1], "test": None}
    test = score_split(store, out_uri, mods, "test")
    if test is not None:
        test = prediction_table(test.column("clip_id").to_pylist(), test.column("label").to_pylist(),
                                np.stack([test.column(c).to_numpy() for c in PROB_COLUMNS], axis=1),
                                np.stack([test.column(f"weight_{m}").to_numpy() for m in mods], axis=1), mods)
        out["test"] = _evaluate_table(test)
        storage.write_table(storage.join(out_uri, "test_predictions.parquet"), test)
    storage.write_json(storage.join(out_uri, "metrics.json"), out)
    log.info("ensemble %s of %d runs (%s): OOF WAF %.4f (members %s)", out_uri, len(runs), weighting, out["waf"],
             [round(m["oof_waf"], 4) for m in members])
    return out


def _evaluate_table(t: pa.Table) -> dict[str, Any] | None:
    y = np.array([LABEL_INDEX.get(lab, -1) if lab else -1 for lab in t.column("label").to_pylist()])
    p = np.stack([t.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
    has = y >= 0
    if not has.any():
        return None
    pred = p[has].argmax(axis=1)
    return {"waf": weighted_f1(y[has], pred), "accuracy": accuracy(y[has], pred), "n": int(has.sum())}


def _oof(ens: Any, store: PartStore, fold_of: dict[str, int]) -> dict[str, Any]:
    """Out-of-fold predictions of the ensemble: each labelled train row by the fold-k mean that never trained on it."""
    ids, labels, probs, weights = [], [], [], []
    for t in store.iter(columns=["split", "label", *ens.modalities]):
        keep = [c in fold_of for c in t.column("clip_id").to_pylist()]
        t = t.filter(pa.array(keep, pa.bool_()))
        if not t.num_rows:
            continue
        p, w = ens.predict(t)
        k = np.array([fold_of[c] for c in t.column("clip_id").to_pylist()])
        rows = np.arange(t.num_rows)
        ids += t.column("clip_id").to_pylist()
        labels += t.column("label").to_pylist()
        probs.append(p[rows, k])
        weights.append(w[rows, k])
    table = prediction_table(ids, labels, np.concatenate(probs), np.concatenate(weights), ens.modalities,
                             extra={"fold": pa.array([fold_of[c] for c in ids], pa.int32())}).sort_by("clip_id")
    ev = _evaluate_table(table) or {"waf": None, "accuracy": None}
    return {"table": table, "waf": ev["waf"], "accuracy": ev["accuracy"]}
