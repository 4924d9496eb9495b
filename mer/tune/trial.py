"""One trial of ``mer tune``: the k-fold run of ``mer train`` (:func:`mer.train.train_run`) for one sampled config,
reporting the mean fold validation WAF to Ray Tune epoch by epoch.

The trial's folds train on the study's fit service (:mod:`mer.train.service`), whose answers carry each epoch's
report; without one, each group of folds (``train.parallel_folds`` groups) is a Ray Train run of its own whose
controller hands each epoch's report to :class:`FoldReports` (a Ray Train ``UserCallback``). Either way the
reports reach the trial through a Ray queue, where :class:`EpochScores` turns them into one score per epoch: the
mean over folds of each fold's best validation WAF so far (a fold that stopped early keeps its final best). ASHA
compares trials on that score at the same epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mer.config import MerConfig
from mer.store import storage
from mer.train import train_run
from mer.train.service import FitClient, using
from mer.tune.space import trial_config

log = logging.getLogger("mer.tune")


class EpochScores:
    """Per-epoch mean fold validation WAF from the folds' reports, released once every fold has reached the epoch
    (or finished)."""

    def __init__(self, folds: int) -> None:
        self.folds = folds
        self.best: dict[int, dict[int, float]] = {k: {} for k in range(folds)}  # fold -> epoch -> best WAF so far
        self.finished: set[int] = set()
        self.released = 0  # last epoch reported to Tune

    def add(self, fold: int, epoch: int, best_waf: float, finished: bool) -> None:
        self.best[fold][epoch] = best_waf
        if finished:
            self.finished.add(fold)

    def _value(self, fold: int, epoch: int) -> float:
        seen = self.best[fold]
        upto = [e for e in seen if e <= epoch]
        # A fold resumed from a checkpoint reports from its resumed epoch on: earlier epochs take its first.
        return seen[max(upto)] if upto else seen[min(seen)]

    def ready(self) -> list[tuple[int, float]]:
        """(epoch, mean WAF) for every epoch that all folds have now reached, in order; each released once."""
        if any(not self.best[k] for k in range(self.folds)):
            return []
        reached = min(max(self.best[k]) if k not in self.finished else 10**9 for k in range(self.folds))
        last = max(max(s) for s in self.best.values())
        upto = min(reached, last)
        out = []
        for e in range(self.released + 1, upto + 1):
            out.append((e, sum(self._value(k, e) for k in range(self.folds)) / self.folds))
        self.released = max(self.released, upto)
        return out


class FoldReports:
    """A Ray Train callback factory: every fold group's controller puts ``(fold, epoch, best WAF, finished)`` on a Ray
    queue the trial reads."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        # No CPU: the queue actor only relays a few numbers per epoch.
        self.queue = Queue(actor_options={"num_cpus": 0})

    def callback(self) -> Any:
        from ray.train import UserCallback

        queue = self.queue

        class _Forward(UserCallback):
            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                m = metrics[0]  # every rank validates on the whole fold: rank 0 speaks for all
                queue.put((int(m["fold"]), int(m["epoch"]), float(m["best_val_waf"]), bool(m.get("finished"))))

        return _Forward()


def _seed_finished_folds(run_uri: str, scores: EpochScores) -> None:
    """A resumed trial's folds that finished before the interruption: their histories, as if just reported."""
    for k in range(scores.folds):
        record = storage.join(run_uri, "folds", f"fold_{k}.json")
        if storage.exists(record):
            hist = storage.read_json(record)["history"]
            for h in hist:
                scores.add(k, int(h["epoch"]), float(h["best_val_waf"]), h is hist[-1])


def run_trial(params: dict[str, Any], *, cfg: MerConfig, features_uri: str, study_uri: str,
              service: Any = None) -> None:
    """Ray Tune function trainable: train ``cfg`` with ``params`` as ``<study>/trials/<trial id>`` (a normal run
    directory) and report ``{"epoch", "waf"}`` per epoch, then the run's figures.

    ``service``: the request queue of the study's fit service (:mod:`mer.train.service`): the trial's folds are
    handed to its warm worker groups, and their epoch reports come back with the answers; without one the trial
    starts its own worker groups and a Ray Train callback relays their reports.

    The run resumes (``train_run(resume=True)``): a trial restarted after a failure, or by ``Tuner.restore`` after
    an interrupted study, skips its finished folds and continues the unfinished ones from their checkpoints.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_uri = storage.join(study_uri, "trials", trial_id)
    tcfg = trial_config(cfg, params)
    scores = EpochScores(tcfg.train.folds)
    _seed_finished_folds(run_uri, scores)
    relay = FoldReports()
    outcome: dict[str, Any] = {}

    def forward(m: dict[str, Any]) -> None:
        relay.queue.put((int(m["fold"]), int(m["epoch"]), float(m["best_val_waf"]), bool(m.get("finished"))))

    def fit() -> None:
        try:
            if service is not None:
                with using(FitClient(service)):
                    outcome["metrics"] = train_run(tcfg, features_uri, run_uri, resume=True, run_name=trial_id,
                                                   progress=forward)
            else:
                outcome["metrics"] = train_run(tcfg, features_uri, run_uri, resume=True, run_name=trial_id,
                                               callbacks=[relay.callback()])
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e
        finally:
            # Every fold report is on the queue by now (a controller's put returns once the queue holds it), so
            # this marks the end and the loop below can wait for reports instead of polling for them.
            relay.queue.put(None)

    # The run trains in a daemon thread while this one reports to Tune: when ASHA stops the trial, Tune ends
    # this actor, and with it the folds' Ray Train controllers it owns.
    worker = threading.Thread(target=fit, name="mer-trial-fit", daemon=True)
    worker.start()
    epoch = 0
    from ray.util.queue import Empty

    while True:
        try:
            report = relay.queue.get(timeout=30)
        except Empty:
            if worker.is_alive():
                continue
            break  # the end marker was never put (the queue failed): the run's own outcome decides below
        if report is None:
            break
        scores.add(*report)
        for epoch, waf in scores.ready():
            tune.report({"epoch": epoch, "waf": waf, "done": False, "run": run_uri})
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    m = outcome["metrics"]
    fold_waf = [f["val_waf"] for f in m["folds"]]
    mean = sum(fold_waf) / len(fold_waf)
    std = (sum((w - mean) ** 2 for w in fold_waf) / len(fold_waf)) ** 0.5
    epoch = max([epoch, *(int(f["epochs"]) for f in m["folds"])])
    tune.report({"epoch": epoch, "waf": m["cv_waf_mean"], "waf_std": std, "oof_waf": m["waf"], "done": True,
                 "run": run_uri, "train_seconds": m["seconds"], "finished_at": time.time()})
