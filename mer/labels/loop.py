"""The semi-supervised label loop (``mer pseudolabel``): sources → refinement → pseudo-label rounds, gated.

Stages, each a k-fold training run on the same folds, each kept only if the gate (:mod:`mer.labels.gate`) says
it does not lower the out-of-fold WAF against the original labels:

0. ``labelled_only`` — the fused run on the labelled rows, plus one run per single modality
   (``labels.source_modalities``): the independent label sources. Their fold models score the pool (and,
   for the refinement, the labelled rows).
1. ``refined`` — the train labels refined by every source's reliability-weighted vote
   (:mod:`mer.labels.relabel`), decided per fold with that fold's models' votes, retrained.
2. ``round_<r>`` — pool clips on which the last accepted fused run and the independent sources agree
   become pseudo-labels, fold by fold and class-balanced (:mod:`mer.labels.pseudolabel`), added to the last
   accepted label table and retrained; k grows each round. A rejected round is recorded with its figures and
   the next round builds on the last accepted stage.

Layout of ``out_uri``::

    sources/<name>/                 stage-0 runs (fused and one per modality), trained as one job
    sources/ray/                    that job's Ray Train checkpoints (without a fit service)
    ray/                            the fit service's checkpoints while the loop runs (removed at its end)
    sources/pool/<name>/            their fold models' predictions on the pool
    sources/reliability.json        each source's reliability on the labelled rows
    refined/labels.parquet          refined label table (+ labels.reliability.json), refined/run/, stage.json,
                                    refined/pool/ (its pool scores, when a round builds on it)
    round_<r>/selection.parquet     every (pool clip, fold) with its posterior, agreement and reason
    round_<r>/labels.parquet, run/, stage.json
    ensemble/                       with ``labels.final: ensemble`` and two or more accepted stages: the mean of
                                    their fold ensembles (a run directory, as ``mer ensemble`` writes one)
    loop.json                       every stage's gate figures and decision; ``best_stage``: the accepted stage
                                    with the highest gate WAF; ``best``: what ``mer score --run <out>`` scores
                                    (the ensemble, or that stage)

A stage is finished when its ``stage.json`` exists; re-running skips finished stages (training and scoring
resume by themselves).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import MerConfig
from mer.evaluation.report import write_loop_report
from mer.labels.evidence import Reliability, class_prior, fit_reliability
from mer.labels.gate import better_share, decide, gate_figures, oof_predictions
from mer.labels.pseudolabel import build_label_table, round_quota, select_pseudo_labels, selection_summary
from mer.labels.relabel import (fit_sources, refine_labels_per_fold, rule_counts, train_labels,
                                write_label_table)
from mer.labels.sources import SourceVotes, pool_votes, read_source, run_oof_votes
from mer.predict.combine import build_ensemble
from mer.predict.score import PRED_SCHEMA, score_features
from mer.runs.layout import LOOP_FILE, SELECTION_FILE
from mer.store import storage
from mer.store.parts import PartStore
from mer.train import train_run
from mer.train.ablation import select_shipped
from mer.train.features import label_index
from mer.train.run import RunRequest, resolve_modalities, train_runs
from mer.train.service import job_service

log = logging.getLogger("mer.labels")

POOL_SPLIT = "unlabeled"


def _test_figures(metrics: dict) -> dict[str, Any] | None:
    test = metrics.get("test")
    return {"waf": test.get("waf"), "accuracy": test.get("accuracy")} if isinstance(test, dict) else None


def _source_modalities(cfg: MerConfig, fused: list[str]) -> list[str]:
    wanted = cfg.labels.source_modalities
    mods = list(fused) if wanted is None else [m for m in wanted if m in fused]
    # A single-modality "fusion" is its own only source: a second identical run would add no independent view.
    return [] if mods == list(fused) and len(fused) == 1 else mods


def _pool_scores(cfg: MerConfig, name: str, run_uri: str, features: PartStore, out: str, *,
                 labelled: bool = False) -> tuple[SourceVotes, SourceVotes | None]:
    """Per-fold predictions of a run's fold models on the pool, scored into ``out`` (a resumable Ray Data
    scoring job); with ``labelled`` also on the labelled train rows, in the same job (fold ``k``'s models on
    every labelled clip: what the per-fold refinement votes with), else None."""
    splits = [POOL_SPLIT, "train"] if labelled else [POOL_SPLIT]
    score_features(cfg, run_uri, features, out, splits=splits)
    scores = PartStore(out)  # listed once scoring has written it
    table = scores.read(columns=["split", "fold_probs"]) if scores.parts else _empty_predictions()
    split = table.column("split").to_pylist()

    def votes(which: str) -> SourceVotes:
        return pool_votes(name, table.filter(pa.array([s == which for s in split], pa.bool_())), cfg.train.folds)

    return votes(POOL_SPLIT), (votes("train") if labelled else None)


def changes_training(refined: pa.Table, run_uri: str) -> bool:
    """Whether a per-fold refined table changes anything fold ``k``'s training sees against the run it would
    replace (``run_uri``: its folds, from its out-of-fold rows): a label or weight of a training row of fold
    ``k``, or a label of a validation row (early stopping reads them; validation weights are 1 anyway)."""
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"), columns=["clip_id", "fold"])
    fold_of = dict(zip(oof.column("clip_id").to_pylist(), oof.column("fold").to_pylist()))
    for r in refined.select(["clip_id", "label", "original_label", "weight", "fold"]).to_pylist():
        validation = r["fold"] is not None and fold_of.get(r["clip_id"]) == r["fold"]
        if r["label"] != r["original_label"] or (not validation and r["weight"] != 1.0):
            return True
    return False


def _empty_predictions() -> Any:
    return PRED_SCHEMA.empty_table()


class LabelLoop:
    """One loop directory: trains or reuses every stage, keeps the decisions in ``loop.json``."""

    def __init__(self, cfg: MerConfig, features: str | PartStore, out_uri: str, *,
                 tables: dict[str, str] | None = None, base_run: str | None = None) -> None:
        # The store is opened once: every stage's training and pool scoring shares its listing and reads.
        self.cfg, self.features, self.out = cfg, PartStore.of(features), out_uri
        self.tables = dict(tables or {})
        self.base_run = base_run
        self.fused_mods = resolve_modalities(cfg, self.features, None)
        self.source_mods = _source_modalities(cfg, self.fused_mods)
        original = train_labels(self.features)
        self.original_ids = original.column("clip_id").to_pylist()
        self.original = dict(zip(self.original_ids, original.column("label").to_pylist()))
        self.original_table = original
        self.y = label_index(original.column("label").to_pylist())
        self.prior = class_prior(self.y)
        self.stages: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ helpers
    def _train(self, run_uri: str, name: str, *, labels_uri: str | None = None,
               modalities: list[str] | None = None) -> dict:
        return train_run(self.cfg, self.features, run_uri, resume=True, labels_uri=labels_uri,
                         modalities=modalities or self.fused_mods, run_name=name)

    def _stage_record(self, name: str, run_uri: str, metrics: dict, labels_uri: str | None, pool_uri: str,
                      best: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
        pred = oof_predictions(run_uri, self.original)
        gate = gate_figures(run_uri, self.original, pred)
        if best is None:
            accepted, why = True, "the labelled-only baseline"
        else:
            lc = self.cfg.labels
            gate["better_share"] = better_share(pred, oof_predictions(best["run"], self.original), self.original,
                                                min_gain=lc.min_gain, resamples=lc.gate_resamples,
                                                seed=self.cfg.train.seed)
            gate["vs"] = best["stage"]
            accepted, why = decide(gate["waf"], best["gate"]["waf"], lc.min_gain, share=gate["better_share"],
                                   confidence=lc.gate_confidence)
        return {"stage": name, "run": run_uri, "labels": labels_uri, "pool": pool_uri, "gate": gate,
                "accepted": accepted, "decision": why, "test": _test_figures(metrics), **extra}

    def _base_labels(self, base: dict[str, Any]) -> pa.Table:
        """The labelled rows of an accepted stage (original or refined), without its pseudo-labels: each
        round picks its pool clips afresh (k grows), and an earlier round's per-fold picks must not leak
        into other folds."""
        if not base.get("labels"):
            return self.original_table.append_column("weight", pa.array(np.ones(len(self.y), np.float32)))
        table = storage.read_table(base["labels"])
        if "source" in table.column_names:
            table = table.filter(pa.array([s != "pseudo" for s in table.column("source").to_pylist()], pa.bool_()))
        return table

    def _finished(self, stage_dir: str) -> dict[str, Any] | None:
        uri = storage.join(stage_dir, "stage.json")
        return storage.read_json(uri) if storage.exists(uri) else None

    def _commit(self, stage_dir: str, record: dict[str, Any]) -> dict[str, Any]:
        storage.write_json(storage.join(stage_dir, "stage.json"), record)
        verdict = "ACCEPTED" if record["accepted"] else "rejected"
        log.info("label loop: %s %s (%s)", record["stage"], verdict, record["decision"])
        return record

    def _untrained(self, stage_dir: str, r: int, base: dict[str, Any], why: str, **extra: Any) -> dict[str, Any]:
        """Round ``r`` recorded as rejected without a run: training it could only repeat a stage already judged."""
        return self._commit(stage_dir, {"stage": f"round_{r}", "run": None, "labels": None, "pool": base["pool"],
                                        "gate": None, "accepted": False, "built_on": base["stage"], "test": None,
                                        **extra, "decision": why})

    # ------------------------------------------------------------------------------------- stages
    def sources(self) -> tuple[dict[str, Any], list[SourceVotes], list[SourceVotes], dict[str, Reliability]]:
        """Stage 0: the fused and single-modality runs, their OOF votes and pool votes, vote tables, and
        every source's reliability. Returns (the labelled-only stage, the per-fold votes on the labelled rows that
        the refinement takes, pool sources, reliabilities)."""
        from concurrent.futures import ThreadPoolExecutor

        runs = {"fused": self.base_run or storage.join(self.out, "sources", "fused")}
        runs.update({m: storage.join(self.out, "sources", m) for m in self.source_mods})
        pools = {n: storage.join(self.out, "sources", "pool", n) for n in runs}
        # The sources are independent runs on the same rows: one training job trains them all (every fold of
        # every source a fit of the same worker groups, which start once), in labels.parallel_runs x
        # train.parallel_folds groups at once.
        requests = [RunRequest(u, None, self.fused_mods if n == "fused" else [n],
                               "labelled_only" if n == "fused" else f"source_{n}") for n, u in runs.items()]
        metrics = train_runs(self.cfg, self.features, requests, resume=True,
                             job_dir=storage.join(self.out, "sources", "ray"),
                             groups=self.cfg.labels.parallel_runs * self.cfg.train.parallel_folds)
        fused_metrics = metrics[0]
        with ThreadPoolExecutor(max_workers=self.cfg.labels.parallel_runs, thread_name_prefix="mer-source") as ex:
            scored = {n: ex.submit(_pool_scores, self.cfg, n, u, self.features, pools[n],
                                   labelled=self.cfg.labels.refine) for n, u in runs.items()}
            votes = [f.result() for f in scored.values()]
        pool = [p for p, _ in votes]
        # Fold k's models on every labelled clip: the per-fold refinement's votes (relabel.refine_labels_per_fold).
        fold_votes = [lv for _, lv in votes if lv is not None]
        labelled = [run_oof_votes(n, u) for n, u in runs.items()]
        fused_run = runs["fused"]
        for name, uri in self.tables.items():
            table = read_source(name, uri)
            labelled.append(table)
            pool.append(table)
            fold_votes.append(table)
        rel = fit_sources(labelled, self.original_ids, self.y, self.prior, self.cfg.labels)
        storage.write_json(storage.join(self.out, "sources", "reliability.json"),
                           {"sources": [r.to_json() for r in rel.values()],
                            "runs": runs, "tables": self.tables})
        stage0 = self._stage_record("labelled_only", fused_run, fused_metrics, None, pools["fused"], None,
                                    {"sources": sorted(rel)})
        return stage0, fold_votes, pool, rel

    def refine(self, fold_votes: list[SourceVotes], rel: dict[str, Reliability], best: dict[str, Any]
               ) -> dict[str, Any]:
        """Stage 1: refined labels from every source, decided per fold with that fold's models' votes
        (:func:`mer.labels.relabel.refine_labels_per_fold`: no fold's labels reach the model judged on
        them), retrained, gated. ``fold_votes``: per-fold votes on the labelled rows (and fold-free tables);
        ``rel``: the sources' reliabilities from their out-of-fold votes."""
        sdir = storage.join(self.out, "refined")
        done = self._finished(sdir)
        if done:
            return done
        labels_uri = storage.join(sdir, "labels.parquet")
        refined = refine_labels_per_fold(self.original_table, fold_votes, rel, self.cfg.relabel,
                                         self.cfg.labels, self.cfg.train.folds)
        write_label_table(labels_uri, refined, rel)
        rules = rule_counts(refined)
        if not changes_training(refined, best["run"]):
            # Training is deterministic: with every fold's training targets and validation labels as the labelled-only
            # run had them, the refined run would repeat it (and the gate would reject the tie).
            return self._commit(sdir, {"stage": "refined", "run": None, "labels": labels_uri, "pool": best["pool"],
                                       "gate": None, "accepted": False, "test": None, "rules": rules,
                                       "decision": "no fold's training labels or weights changed (what the sources "
                                                   "doubt lies in each fold's own validation rows): the run would "
                                                   "repeat labelled_only; not trained"})
        run_uri = storage.join(sdir, "run")
        metrics = self._train(run_uri, "refined", labels_uri=labels_uri)
        return self._commit(sdir, self._stage_record("refined", run_uri, metrics, labels_uri,
                                                     storage.join(sdir, "pool"), best, {"rules": rules}))

    def pseudo_round(self, r: int, base: dict[str, Any], others: list[SourceVotes],
                     rel: dict[str, Reliability], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Round ``r``: pool pseudo-labels from the accepted stage ``base`` and the sources, retrained, gated.
        ``previous``: the last round trained, whose training a round with the very same label table would repeat."""
        sdir = storage.join(self.out, f"round_{r}")
        done = self._finished(sdir)
        if done:
            return done
        fused_pool, _ = _pool_scores(self.cfg, "fused", base["run"], self.features, base["pool"])
        if not fused_pool.ids:
            # Nothing to pseudo-label: a retrain would only repeat the accepted stage.
            return self._untrained(sdir, r, base, f"no clip in the store's {POOL_SPLIT!r} split: nothing to "
                                                  "pseudo-label, not trained")
        # The accepted run's own reliability: its OOF predictions against the original labels.
        lc = self.cfg.labels
        rel = dict(rel)
        rel["fused"] = fit_reliability("fused", "probs", run_oof_votes("fused", base["run"]).rows(self.original_ids),
                                       self.y, self.prior, shrinkage=lc.reliability_shrinkage,
                                       max_weight=lc.reliability_max_weight, min_votes=lc.min_labelled_votes)
        quota = round_quota(self.cfg.pseudolabel, r, len(self.original_ids), self.prior)
        selection = select_pseudo_labels(fused_pool.ids, fused_pool, others, rel, self.prior, quota,
                                         self.cfg.pseudolabel)
        storage.write_table(storage.join(sdir, "selection.parquet"), selection)
        summary = selection_summary(selection)
        if not summary["selected"]:
            # No pool clip has the agreement the rules ask for: a retrain would only repeat the accepted stage.
            return self._untrained(sdir, r, base, "no pool clip qualified (see selection.parquet reasons): not trained",
                                   pseudo=summary, selection=storage.join(sdir, "selection.parquet"))
        table = build_label_table(self._base_labels(base), selection)
        if (previous and not previous["accepted"] and previous["built_on"] == base["stage"]
                and storage.read_table(previous["labels"]).equals(table)):
            # Agreement, not the quota, bounded the picks: the same label table on the same base would train the
            # same run (training is deterministic) and meet the same rejection.
            return self._untrained(sdir, r, base, f"the same pseudo-labels as {previous['stage']} (rejected) on the "
                                                  "same base: not trained again",
                                   pseudo=summary, selection=storage.join(sdir, "selection.parquet"))
        labels_uri = storage.join(sdir, "labels.parquet")
        write_label_table(labels_uri, table, rel, {"quota_per_fold": dict(zip(
            [str(x) for x in range(len(quota))], quota.tolist())), "built_on": base["stage"]})
        run_uri = storage.join(sdir, "run")
        metrics = self._train(run_uri, f"round_{r}", labels_uri=labels_uri)
        summary["quota_per_class"] = quota.tolist()
        return self._commit(sdir, self._stage_record(f"round_{r}", run_uri, metrics, labels_uri,
                                                     storage.join(sdir, "pool"), base,
                                                     {"pseudo": summary, "built_on": base["stage"],
                                                      "selection": storage.join(sdir, "selection.parquet")}))

    def final(self, best_stage: dict[str, Any]) -> dict[str, Any]:
        """What ``mer score`` uses: with ``labels.final: ensemble`` and two or more accepted stages, the mean of
        their fold ensembles (built in ``<out>/ensemble``, or reused when it holds the same runs); otherwise
        ``best_stage``."""
        members = [s for s in self.stages if s["accepted"] and s["run"]]
        if self.cfg.labels.final != "ensemble" or len(members) < 2:
            return best_stage
        uri = storage.join(self.out, "ensemble")
        runs, names = [s["run"] for s in members], [s["stage"] for s in members]
        metrics_uri = storage.join(uri, "metrics.json")
        metrics = storage.read_json(metrics_uri) if storage.exists(metrics_uri) else None
        if metrics is None or [m["run"] for m in metrics.get("members", [])] != runs:
            if storage.exists(uri):
                storage.delete_dir(uri)  # members of an earlier, different set of accepted stages
            metrics = build_ensemble(runs, uri, weighting="mean", names=names)
        # Shown, not compared: a stage's out-of-fold predictions come from each fold's best validation epoch on
        # that very fold, which flatters a single run more than the mean of several.
        gate = gate_figures(uri, self.original)
        return {"stage": "ensemble", "run": uri, "labels": None, "members": names, "gate_waf": gate["waf"],
                "gate": gate, "test": _test_figures(metrics),
                "why": (f"mean of the {len(names)} accepted stages' fold ensembles ({', '.join(names)}; "
                        f"labels.final=ensemble); the best single stage is {best_stage['stage']} "
                        f"(gate WAF {best_stage['gate_waf']:.4f})")}

    def select(self, final: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
        """What ships (``labels.select_final``): the highest out-of-fold WAF against the original labels among
        ``final`` (the fused best stage, or the accepted stages' ensemble), the stacked run over the best
        stage's fused run and the single-modality source runs (``<out>/stacked``, :mod:`mer.train.stack`), and
        the best single-modality run; the record goes to ``<out>/selection.json`` and the returned ``best``."""
        singles = {m: storage.join(self.out, "sources", m) for m in self.source_mods}
        record = select_shipped({"fused": final["run"]}, singles, storage.join(self.out, "stacked"),
                                labels=self.original, fused_member=best["run"])
        storage.write_json(storage.join(self.out, SELECTION_FILE), record)
        log.info("label loop ships %s: %s", record["candidate"], record["why"])
        if record["kind"] == "fused":
            return {**final, "selection": record,
                    "why": f"{final['why']}; selected over stacked and single runs: {record['why']}"}
        metrics = storage.read_json(storage.join(record["run"], "metrics.json"))
        name = "stacked" if record["kind"] == "stacked" else f"single_{record['candidate']}"
        return {"stage": name, "run": record["run"], "labels": None, "gate_waf": record["oof_waf"],
                "gate": gate_figures(record["run"], self.original), "test": _test_figures(metrics),
                "selection": record, "why": f"selected: {record['why']}"}

    def run(self, rounds: int | None = None) -> dict[str, Any]:
        """Run (or resume) every stage; write and return ``loop.json``. Every stage's runs train on one fit service
        (:func:`mer.train.service.job_service`): worker groups that start once for the whole loop."""
        groups = self.cfg.labels.parallel_runs * self.cfg.train.parallel_folds
        with job_service(self.cfg, self.features, storage.join(self.out, "ray"), groups=groups, mods=self.fused_mods):
            return self._run(rounds)

    def _run(self, rounds: int | None) -> dict[str, Any]:
        t0 = time.time()
        stage0, fold_votes, pool, rel = self.sources()
        self.stages = [stage0]
        best = stage0
        if self.cfg.labels.refine:
            rec = self.refine(fold_votes, rel, best)
            self.stages.append(rec)
            if rec["accepted"]:
                best = rec
        others = [s for s in pool if s.name != "fused"]
        previous = None
        for r in range(1, (rounds or self.cfg.pseudolabel.rounds) + 1):
            rec = self.pseudo_round(r, best, others, rel, previous)
            self.stages.append(rec)
            previous = rec if rec["run"] else previous  # the last round trained: what a repeat would repeat
            if rec["accepted"]:
                best = rec
        best_stage = {"stage": best["stage"], "run": best["run"], "labels": best["labels"],
                      "gate_waf": best["gate"]["waf"],
                      "why": (f"highest gate WAF among accepted stages ({best['gate']['waf']:.4f}: out-of-fold "
                              f"WAF against the original labels, on {best['gate']['n']} labelled clips)")}
        shipped = self.final(best_stage)
        if self.cfg.labels.select_final and self.source_mods:
            shipped = self.select(shipped, best)
        result = {
            "features": self.features.uri, "out": self.out, "stages": self.stages,
            "best_stage": best_stage, "best": shipped,
            "seconds": round(time.time() - t0, 1),
        }
        storage.write_json(storage.join(self.out, LOOP_FILE), result)
        try:
            result["report"] = write_loop_report(self.out)
        except Exception as e:  # noqa: BLE001 - loop.json is committed; the report is only a view of it
            log.warning("label loop %s: report.html not written: %s: %s", self.out, type(e).__name__, e)
        return result


def label_loop(cfg: MerConfig, features_uri: str | PartStore, out_uri: str, *,
               tables: dict[str, str] | None = None, base_run: str | None = None, rounds: int | None = None
               ) -> dict[str, Any]:
    """Run (or resume) the whole label loop into ``out_uri``; returns the content of ``loop.json``.

    ``tables``: extra vote tables ({name: uri}, e.g. an LLM vote); ``base_run``: reuse a finished fused run
    (same folds and seed) as the labelled-only stage.
    """
    return LabelLoop(cfg, features_uri, out_uri, tables=tables, base_run=base_run).run(rounds)
