"""``mer tune``: a Ray Tune study over the ``train`` section, each trial a k-fold run of ``mer train``.

Layout of ``out_uri``: ``tune/study/`` (Ray Tune's experiment: what ``Tuner.restore`` resumes), ``trials/<trial
id>/`` (each trial's run directory), ``leaderboard.parquet``, ``waf_vs_params.png``, ``study.json`` and ``best/``
(the best finished trial's run directory, without its checkpoints: ``mer score --run`` accepts it). Trials are
ranked by their mean fold validation WAF only — the test split never decides.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from mer.config import MerConfig
from mer.runtime.session import init_ray
from mer.store import storage
from mer.train.fold import ray_storage
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
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, features_uri=features_uri, study_uri=out_uri),
        {"cpu": cfg.tune.trial_cpus, "memory": cfg.tune.trial_memory})
    exp_path = f"{storage_path}/{STUDY_NAME}"
    exp_uri = storage.join(out_uri, "tune", STUDY_NAME)
    if tune.Tuner.can_restore(exp_uri if fs is None else exp_path, storage_filesystem=fs):
        log.info("resuming study %s (Tuner.restore)", exp_uri)
        tuner = tune.Tuner.restore(exp_uri if fs is None else exp_path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        log.info("study %s: %d trials, %d at a time, ASHA %s", exp_uri, cfg.tune.num_samples, concurrency,
                 "on" if cfg.tune.asha.enabled else "off")
        tuner = _tuner(cfg, trainable, storage_path, fs, concurrency)
    grid = tuner.fit()
    summary = finish_study(cfg, out_uri, grid)
    summary.update({"seconds": round(time.time() - t0, 2), "max_concurrent_trials": concurrency})
    storage.write_json(storage.join(out_uri, "study.json"), summary)
    return summary
