"""Ablation: each single modality vs. the fusion of all, same protocol, test-split WAF per setting; then the
stacked run over them and the selection of what ships (:mod:`mer.train.stack`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.config import PROB_COLUMNS, MerConfig
from mer.evaluation.metrics import weighted_f1
from mer.runs.layout import SELECTION_FILE
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.features import label_index
from mer.train.run import train_run
from mer.train.service import job_service
from mer.train.stack import build_stacked_run, select_candidate


def ablation_table(cfg: MerConfig, features_uri: str | PartStore, out_uri: str) -> dict[str, float]:
    """Train each modality of ``cfg.train.modalities`` present in the store alone, then all fused.

    Returns ``{setting: WAF}`` (test split when labelled, else out-of-fold), also written to
    ``<out>/ablation.json``; each setting's run lives in ``<out>/<setting>`` and is resumed if present. With two
    or more modalities the fused and single runs are also stacked (``<out>/stacked``) and the candidate with
    the best out-of-fold WAF is selected (``<out>/selection.json``: ``mer score --run <out>`` scores it).
    """
    store = PartStore.of(features_uri)  # opened once for every setting's run
    mods = [m for m in cfg.train.modalities if m in store.columns]
    if not mods:
        raise ValueError(f"none of {cfg.train.modalities} in feature store {store.uri}")
    settings = {m: [m] for m in mods}
    settings["fused"] = mods
    runs = {name: storage.join(out_uri, name) for name in settings}
    # The settings' runs one after another on one fit service: worker groups that start once.
    with job_service(cfg, store, storage.join(out_uri, "ray"), groups=cfg.train.parallel_folds, mods=mods):
        for name, ms in settings.items():
            train_run(cfg, store, runs[name], resume=True, modalities=ms)
    table = {name: f["waf"] for name, f in run_figures(runs).items()}
    storage.write_json(storage.join(out_uri, "ablation.json"), table)
    print(format_ablation(table))
    if len(mods) >= 2:
        selection = select_shipped(runs, {m: runs[m] for m in mods}, storage.join(out_uri, "stacked"))
        storage.write_json(storage.join(out_uri, SELECTION_FILE), selection)
        print(format_selection(selection))
    return table


def select_shipped(runs: dict[str, str], singles: dict[str, str], stacked_uri: str,
                   labels: dict[str, str] | None = None, fused_member: str | None = None) -> dict[str, Any]:
    """Stack the fused run (``fused_member``, default ``runs["fused"]``) and the ``singles`` runs into
    ``stacked_uri`` and select what ships among ``runs["fused"]``, stacked and the best single by out-of-fold
    WAF (against ``labels`` when given, else each run's own out-of-fold labels); returns the selection record
    with the shipped ``run`` and each candidate's test WAF (shown, never used to choose)."""
    if storage.exists(stacked_uri):
        storage.delete_dir(stacked_uri)  # members of an earlier selection
    stacked = build_stacked_run([fused_member or runs["fused"], *singles.values()], stacked_uri,
                                names=["fused", *singles], labels=labels)
    oof = {name: oof_waf(run, labels) for name, run in {"fused": runs["fused"], **singles}.items()}
    record = select_candidate(("fused", oof["fused"]), ("stacked", float(stacked["waf"])),
                              {m: oof[m] for m in singles})
    all_runs = {"fused": runs["fused"], "stacked": stacked_uri, **singles}
    record["run"] = all_runs[record["candidate"]]
    record["stage"] = record["candidate"]
    record["gate_waf"] = record["oof_waf"]
    for c in record["candidates"]:
        c["run"] = all_runs[c["name"]]
        metrics = storage.read_json(storage.join(c["run"], "metrics.json"))
        c["test_waf"] = (metrics.get("test") or {}).get("waf")
    record["meta_learners"] = stacked["meta_learners"]
    return record


def oof_waf(run_uri: str, labels: dict[str, str] | None = None) -> float:
    """A run's out-of-fold WAF (against ``labels`` on the rows it has, else its own OOF labels)."""
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"))
    ids = oof.column("clip_id").to_pylist()
    names = [labels.get(c) for c in ids] if labels is not None else oof.column("label").to_pylist()
    y = label_index(names)
    p = np.stack([np.asarray(oof.column(c).to_numpy(zero_copy_only=False)) for c in PROB_COLUMNS], axis=1)
    keep = y >= 0
    return weighted_f1(y[keep], p[keep].argmax(axis=1))


def format_selection(record: dict[str, Any]) -> str:
    """What ships and why, with every candidate's out-of-fold (and test, shown only) WAF."""
    lines = [f"ships: {record['candidate']} ({record['why']})", f"{'candidate':<16}{'OOF WAF':>9}{'test WAF':>9}"]
    for c in record["candidates"]:
        t = "-" if c.get("test_waf") is None else f"{c['test_waf']:.4f}"
        lines.append(f"{c['kind'] + ':' + c['name']:<16}{c['oof_waf']:>9.4f}{t:>9}")
    return "\n".join(lines)


def run_figures(runs: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{name: {"waf", "accuracy"}}`` of finished runs: on the test split when the store labels one (the fold
    ensemble), else out of fold."""
    out: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        metrics = storage.read_json(storage.join(run, "metrics.json"))
        figures = metrics.get("test") or metrics
        out[name] = {"waf": float(figures["waf"]), "accuracy": float(figures["accuracy"])}
    return out


def format_ablation(table: dict[str, float]) -> str:
    """Plain-text table: setting, WAF."""
    lines = [f"{'setting':<16}{'WAF':>8}"]
    lines += [f"{name:<16}{waf:>8.4f}" for name, waf in table.items()]
    return "\n".join(lines)
