"""Stacking over the runs the label loop and ``mer ablation`` already train on the same folds, and the choice of
what ships.

**Meta-learner.** Its inputs are the members' out-of-fold class probabilities (the fused run and one run per
modality; a member that sees none of a row's modalities gives that row the uniform distribution). Two
families compete: *class-wise weighted averaging* (per class a softmax-normalised weight per member, fitted by
L2-regularised log-loss; the weighted soft voting of the MER2024 #6 and MER2025 #2 entries) and a
*regularised multinomial logistic regression* on the members' log-probabilities (classic stacking, Wolpert 1992;
several inverse regularisation strengths). Which one is chosen by **nested cross-validation on the labelled rows
only**: for each outer fold ``k`` the candidates are compared by leave-one-fold-out over the *other* folds, the
winner is fitted on all of them and predicts fold ``k``. Fold ``k``'s meta-learner therefore never saw a row of
fold ``k`` — neither to be fitted nor to be chosen — and the stacked run's out-of-fold predictions are as honest
as its members'. Scoring uses the same per-fold meta-learners: the stacked run's fold ``k`` is meta-learner
``k`` applied to the members' fold-``k`` models, so the pseudo-label rounds' "fold ``k``'s models never saw
fold ``k``" holds for it too.

**Selection.** :func:`select_candidate` ships the candidate with the highest out-of-fold WAF among the fused run,
the stacked run and the best single modality (never the test split) and writes why: the same judgement as the
label loop's gate (:mod:`mer.labels.gate`), on the same folds.

Run directory (``mer score --run`` accepts it): ``models/model.json`` (``stack``: the per-fold meta-learners;
``members``: as ``mer ensemble`` writes them), ``members/<i>_<name>/models``, ``oof.parquet``, ``metrics.json``,
``test_predictions.parquet`` when the store labels a test split.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS
from mer.evaluation.metrics import accuracy, weighted_f1
from mer.runs.layout import common_store, model_file, run_record
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.features import LABEL_INDEX, label_index, table_inputs
from mer.train.meta import fit_stack
from mer.train.results import prediction_table
from mer.train.run import score_split

log = logging.getLogger("mer.stack")

def _oof_table(run_uri: str) -> pa.Table:
    return storage.read_table(storage.join(run_uri, "oof.parquet")).sort_by("clip_id")


def build_stacked_run(run_uris: list[str], out_uri: str, names: list[str] | None = None,
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Stack finished runs (same store, same folds: the label loop's or ``mer ablation``'s) into the run
    directory ``out_uri``; returns its metrics (``waf``: the nested out-of-fold WAF; ``test`` when labelled).

    ``labels`` ({clip_id: label}, e.g. the label loop's original labels): what the meta-learner fits and is
    judged against; default the first run's out-of-fold labels. The rows stacked are the out-of-fold rows every
    run has (with a label)."""
    if len(run_uris) < 2:
        raise ValueError("stacking needs at least two runs")
    metrics = [storage.read_json(storage.join(r, "metrics.json")) for r in run_uris]
    features_uri = common_store(run_uris, "stacking")
    oofs = [_oof_table(r) for r in run_uris]
    if labels is None:
        labels = {c: lab for c, lab in zip(oofs[0].column("clip_id").to_pylist(), oofs[0].column("label").to_pylist())
                  if lab is not None}
    common = set(labels)
    for t in oofs:
        common &= set(t.column("clip_id").to_pylist())
    ids = sorted(common)
    if not ids:
        raise ValueError(f"stacking: runs {run_uris} share no labelled out-of-fold row")
    pos = [{c: i for i, c in enumerate(t.column("clip_id").to_pylist())} for t in oofs]
    rows = [np.array([p[c] for c in ids]) for p in pos]
    folds_of = [np.asarray(t.column("fold").to_numpy())[r] for t, r in zip(oofs, rows)]
    for r, f in zip(run_uris[1:], folds_of[1:]):
        if not np.array_equal(f, folds_of[0]):
            raise ValueError(f"stacking: run {r} drew other folds than {run_uris[0]}")
    fold_of = folds_of[0]
    y = label_index([labels[c] for c in ids])
    # Whether each member saw one of its modalities on each row (a row's OOF probabilities exist either way).
    store = PartStore(features_uri)
    mods_all = list(dict.fromkeys(m for mt in metrics for m in mt["modalities"]))
    spec_dims = [storage.read_json(model_file(r)).get("dims") or {} for r in run_uris]
    present = _presence(store, ids, [mt["modalities"] for mt in metrics], spec_dims)
    fit = fit_stack([_probs(t)[r] for t, r in zip(oofs, rows)], y, fold_of, present)

    members = []
    for i, (r, m) in enumerate(zip(run_uris, metrics)):
        name = f"{i}_{names[i] if names else r.rstrip('/').rsplit('/', 1)[-1]}"
        storage.copy_dir(storage.join(r, "models"), storage.join(out_uri, "members", name, "models"))
        storage.write_json(storage.join(out_uri, "members", name, "metrics.json"), m)
        members.append({"name": name, "path": f"members/{name}", "run": r, "weight": 1.0,
                        "oof_waf": m["waf"], "test_waf": (m.get("test") or {}).get("waf"),
                        "modalities": m["modalities"]})
    spec: dict[str, Any] = {"stack": {str(k): v for k, v in fit.metas.items()}, "members": members,
                            "modalities": mods_all, "labels": list(LABELS)}
    recorded = run_record(run_uris[0])
    if recorded is not None:
        spec["features"] = recorded
    storage.write_json(model_file(out_uri), spec)
    zeros = np.zeros((len(ids), len(mods_all)), np.float32)
    oof = prediction_table(ids, [labels[c] for c in ids], fit.oof_probs, zeros, mods_all,
                           extra={"fold": pa.array(fold_of.astype(np.int32), pa.int32())})
    storage.write_table(storage.join(out_uri, "oof.parquet"), oof)
    pred = fit.oof_probs.argmax(axis=1)
    out: dict[str, Any] = {"model": "stacked", "members": members, "modalities": mods_all,
                           "meta_learners": {str(k): f"{v['kind']}:{v['reg']:g}" for k, v in fit.metas.items()},
                           "waf": weighted_f1(y, pred), "accuracy": accuracy(y, pred),
                           "features": features_uri, "run_name": out_uri.rstrip("/").rsplit("/", 1)[-1],
                           "test": None}
    test = score_split(store, out_uri, mods_all, "test")
    if test is not None:
        labels = test.column("label").to_pylist()
        p = np.stack([test.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
        w = np.stack([test.column(f"weight_{m}").to_numpy() for m in mods_all], axis=1)
        storage.write_table(storage.join(out_uri, "test_predictions.parquet"),
                            prediction_table(test.column("clip_id").to_pylist(), labels, p, w, mods_all))
        yt = np.array([LABEL_INDEX.get(lab, -1) if lab else -1 for lab in labels])
        if (yt >= 0).any():
            pt = p[yt >= 0].argmax(axis=1)
            out["test"] = {"waf": weighted_f1(yt[yt >= 0], pt), "accuracy": accuracy(yt[yt >= 0], pt),
                           "n": int((yt >= 0).sum())}
    storage.write_json(storage.join(out_uri, "metrics.json"), out)
    log.info("stacked %s over %d runs: OOF WAF %.4f (meta-learners %s)", out_uri, len(run_uris), out["waf"],
             out["meta_learners"])
    return out


def _probs(t: pa.Table) -> np.ndarray:
    return np.stack([np.asarray(t.column(c).to_numpy(zero_copy_only=False), np.float64) for c in PROB_COLUMNS],
                    axis=1)


def _presence(store: PartStore, ids: list[str], member_mods: list[list[str]],
              dims: list[dict[str, int]]) -> list[np.ndarray]:
    """Per member, [N] bool in ``ids`` order: the row holds one of the member's modalities."""
    pos = {c: i for i, c in enumerate(ids)}
    out = [np.zeros(len(ids), bool) for _ in member_mods]
    cols = list(dict.fromkeys(m for ms in member_mods for m in ms))
    for t in store.iter(columns=cols):
        keep = [c in pos for c in t.column("clip_id").to_pylist()]
        t = t.filter(pa.array(keep, pa.bool_()))
        if not t.num_rows:
            continue
        rows = np.array([pos[c] for c in t.column("clip_id").to_pylist()])
        for j, (ms, d) in enumerate(zip(member_mods, dims)):
            _, mask = table_inputs(t, ms, {m: int(d[m]) for m in ms})
            out[j][rows] = mask.any(axis=1)
    return out


# ------------------------------------------------------------------------------------------ selection
def candidate_label(kind: str, name: str) -> str:
    """How a candidate reads in a line: ``fused``, ``stacked``, ``single audio`` (the kind once, not ``fused fused``)."""
    return kind if name == kind else f"{kind} {name}"


def select_candidate(fused: tuple[str, float], stacked: tuple[str, float] | None,
                     singles: dict[str, float]) -> dict[str, Any]:
    """What ships: the highest out-of-fold WAF among the fused run, the stacked run and the best single modality
    (``(name, OOF WAF)`` each; ``singles``: modality → OOF WAF). Ties go to the earlier of fused, stacked, single
    (the simpler system to explain wins nothing, but the fused model is what the project is about). Returns the
    selection record: ``candidate``, its ``oof_waf``, every candidate's figure and ``why``."""
    cands: list[tuple[str, str, float]] = [("fused", fused[0], float(fused[1]))]
    if stacked is not None:
        cands.append(("stacked", stacked[0], float(stacked[1])))
    best_single = max(singles.items(), key=lambda kv: kv[1]) if singles else None
    if best_single is not None:
        cands.append(("single", best_single[0], float(best_single[1])))
    kind, name, waf = cands[0]
    for c in cands[1:]:
        if c[2] > waf + 1e-9:
            kind, name, waf = c
    others = ", ".join(f"{candidate_label(k, n)} {w:.4f}" for k, n, w in cands if (k, n) != (kind, name))
    return {"candidate": name, "kind": kind, "oof_waf": waf,
            "candidates": [{"kind": k, "name": n, "oof_waf": w} for k, n, w in cands],
            "singles": dict(singles),
            "why": f"highest out-of-fold WAF ({waf:.4f}; {others}); the test split is never used to choose"}
