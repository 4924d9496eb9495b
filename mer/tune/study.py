"""``mer tune``: a Ray Tune study over the ``train`` section, each trial a k-fold run of ``mer train``.

Layout of ``out_uri``: ``tune/study/`` (Ray Tune's experiment: what ``Tuner.restore`` resumes), ``trials/<trial
id>/`` (each trial's run directory), ``leaderboard.parquet``, ``waf_vs_params.png``, ``study.json`` and ``best/``
(the best finished trial's run directory, without its checkpoints: ``mer score --run`` accepts it). Trials are
ranked by their mean fold validation WAF only — the test split never decides.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

from mer.config import MerConfig
from mer.runtime.session import init_ray
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.fold import ray_storage
from mer.train.service import job_service
from mer.tune.leaderboard import finish_study
from mer.tune.space import default_point, param_space, trial_config, trial_cpus_gpus
from mer.tune.trial import run_trial

log = logging.getLogger("mer.tune")

STUDY_NAME = "study"


def auto_concurrency(cfg: MerConfig) -> int:
    """Trials at once when ``tune.max_concurrent_trials`` is 0: as many as the cluster's CPUs (and GPUs) hold,
    each trial holding its folds' worker groups (``tune.train`` applied)."""
    import ray


    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    cpus, gpus = trial_cpus_gpus(trial_config(cfg, {}))
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0.0) / cpus] if cpus else []
    if gpus:
        fits.append(have.get("GPU", 0.0) / gpus)
    return max(1, math.floor(min(fits) + 1e-9)) if fits else cfg.tune.num_samples


def _max_epochs(cfg: MerConfig) -> int:
    dim = cfg.tune.dimensions.get("max_epochs")
    top = trial_config(cfg, {}).train.max_epochs
    if dim is not None:
        top = max(top, *(int(x) for x in dim[1:]))
    return top


def _tuner(cfg: MerConfig, trainable: Any, storage_path: str, fs: Any, concurrency: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator


    tc = cfg.tune
    max_t = _max_epochs(cfg)
    # stop_last_trials=False: a trial that survives every rung reaches max_t at its last epoch and must still
    # finish its run (write the run directory) and report it.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(tc.asha.grace_period, max_t),
                               reduction_factor=tc.asha.reduction_factor, stop_last_trials=False)
                 if tc.asha.enabled else FIFOScheduler())
    # The generator itself bounds the trials in flight (Tune ignores max_concurrent_trials for a SearchGenerator).
    search = BasicVariantGenerator(points_to_evaluate=[default_point(cfg)] if tc.include_default else None,
                                   max_concurrent=concurrency, random_state=tc.seed)
    return tune.Tuner(
        trainable, param_space=param_space(tc),
        tune_config=tune.TuneConfig(metric="waf", mode="max", num_samples=tc.num_samples, search_alg=search,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=STUDY_NAME, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=tc.max_failures), verbose=1),
    )


def tune_study(cfg: MerConfig, features_uri: str, out_uri: str) -> dict[str, Any]:
    """Run (or resume) the study of ``cfg.tune`` on a feature store; returns ``study.json``'s content.

    A study directory that holds an experiment is resumed with ``Tuner.restore`` (unfinished and errored trials
    rerun, each resuming its run's finished folds); its search space and settings are the ones it started with.
    """
    import ray
    from ray import tune

    if not ray.is_initialized():
        init_ray(cfg)
    t0 = time.time()
    storage_path, fs = ray_storage(storage.join(out_uri, "tune"))
    concurrency = auto_concurrency(cfg)
    with _study_service(cfg, features_uri, out_uri, concurrency) as svc:
        service = svc.requests_handle() if svc is not None else None
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, cfg=cfg, features_uri=features_uri, study_uri=out_uri, service=service),
            {"cpu": cfg.tune.trial_cpus, "memory": cfg.tune.trial_memory})
        grid = _fit(cfg, trainable, storage_path, fs, exp_uri=storage.join(out_uri, "tune", STUDY_NAME),
                    concurrency=concurrency)
    summary = finish_study(cfg, out_uri, grid)
    summary.update({"seconds": round(time.time() - t0, 2), "max_concurrent_trials": concurrency,
                    "fit_service": service is not None})
    storage.write_json(storage.join(out_uri, "study.json"), summary)
    return summary


# Space keys that size a worker group: trials that differ in them cannot share a fit service's groups.
_GROUP_KEYS = ("resources.concurrency", "resources.num_cpus", "resources.num_gpus", "resources.memory")


def _study_service(cfg: MerConfig, features_uri: str, out_uri: str, concurrency: int
                   ) -> contextlib.AbstractContextManager[Any]:
    """The study's fit service (:func:`mer.train.service.job_service`): as many worker groups as the trials at once
    train folds at once, shaped by ``tune.train``; none when the search space changes a worker group's shape."""
    if any(k in cfg.tune.dimensions for k in _GROUP_KEYS):
        return contextlib.nullcontext()
    return job_service(base := trial_config(cfg, {}), PartStore.of(features_uri),
                       storage.join(out_uri, "tune", "service"), groups=service_groups(cfg, base, concurrency))


def service_groups(cfg: MerConfig, base: MerConfig, concurrency: int) -> int:
    """Worker groups of a study's fit service: one per fold the trials at once train at once, but no more than the
    study has fits, and, for CPU workers, no more than the cluster's CPUs run at full speed. A fractional CPU lets
    trials that each start their own groups share a small machine; a busy worker still takes a whole core, and on
    a service the trials share groups through its queue, so more groups than cores only add start-ups (on the
    2-core box: 4 groups of 2 workers 216 trials/h, 1 group 331)."""
    import ray

    tc = base.train
    groups = min(concurrency * max(1, min(tc.parallel_folds, tc.folds)), cfg.tune.num_samples * tc.folds)
    if tc.resources.num_gpus == 0:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        groups = min(groups, max(1, math.floor(cpus / tc.resources.concurrency + 1e-9)))
    return max(1, groups)


def _fit(cfg: MerConfig, trainable: Any, storage_path: str, fs: Any, *, exp_uri: str, concurrency: int) -> Any:
    """Ray Tune's study: restored when ``exp_uri`` holds one, else started; returns its result grid."""
    from ray import tune

    exp_path = f"{storage_path}/{STUDY_NAME}"
    if tune.Tuner.can_restore(exp_uri if fs is None else exp_path, storage_filesystem=fs):
        log.info("resuming study %s (Tuner.restore)", exp_uri)
        tuner = tune.Tuner.restore(exp_uri if fs is None else exp_path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        log.info("study %s: %d trials, %d at a time, ASHA %s", exp_uri, cfg.tune.num_samples, concurrency,
                 "on" if cfg.tune.asha.enabled else "off")
        tuner = _tuner(cfg, trainable, storage_path, fs, concurrency)
    return tuner.fit()
