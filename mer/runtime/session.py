"""Process set-up shared by the CLI and ``jobs/``: Ray connection, storage and cache locations."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mer.config import MerConfig, gpu_requests
from mer.runtime import console, placement
from mer.runtime.placement import Cluster, fit_local
from mer.store import storage

log = logging.getLogger("mer")


def setup_logging(level: str = "INFO", log_dir: str | None = None) -> None:
    """Console and log files of a command (:mod:`mer.runtime.console`)."""
    console.setup(level, log_dir)


def _job_env_vars() -> dict[str, str] | None:
    """The env_vars of the submitted job's runtime_env, or None outside ``ray job submit``."""
    blob = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not blob:
        return None
    try:
        return dict((json.loads(blob).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def init_ray(cfg: MerConfig, **extra: Any) -> MerConfig:
    """Connect to Ray — the configured address, the cluster of a submitted job, or a new local instance — and
    return ``cfg`` as the stages must run there: fitted to the machine when this call started a local Ray
    (:func:`mer.runtime.placement.fit_local`, one log line says what changed), unchanged on a cluster it joined (whose
    streams are then checked before they start, :func:`mer.runtime.placement.ensure_placeable`).

    Inside ``ray job submit`` RAY_ADDRESS is set, so ``ray.init()`` with no address joins that cluster; the
    job's runtime_env already carries its env_vars to every worker, and Ray refuses a driver runtime_env that
    repeats one of its keys, so only the variables the job did not set are added.
    """
    import ray


    storage.configure(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    if ray.is_initialized():
        return fit_here(cfg)
    env_vars = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("AWS_", "HF_", "TRANSFORMERS_", "VLLM_", "MER_")) or k in ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR")
    }
    job_env = _job_env_vars()
    if job_env is not None:
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    elif not os.environ.get("RAY_ADDRESS"):
        # A new local Ray: a bare ray.init() would join whatever `ray start` last ran on this machine (even a
        # dead one, hanging on it); joining a running local cluster is `ray.address: auto`.
        kwargs["address"] = "local"
        if cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        if cfg.ray.object_store_memory is not None:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory
    kwargs.update(extra)
    console.tame_libraries()  # Ray's own console handlers exist from `import ray`: tame them before init talks
    ray.init(**kwargs)
    _LOCAL["started"] = kwargs.get("address") == "local"
    placement.set_policy(check=not _LOCAL["started"], autoscaler=cfg.ray.autoscaler)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.ray.target_max_block_size
    # mer prints one progress line per stream; Ray Data's per-operator bars are for --log-level debug.
    ctx.enable_progress_bars = log.getEffectiveLevel() <= logging.DEBUG
    console.tame_libraries()
    console.route_worker_output()
    resources = ray.cluster_resources()
    log.debug("ray resources: %s", resources)
    if _LOCAL["started"]:
        return fit_here(cfg)
    wanted = gpu_requests(cfg)
    if wanted and not resources.get("GPU"):
        # Not an error: an autoscaling cluster may add GPU nodes once the stages ask for them.
        log.warning("the config requests GPUs (%s) but the Ray cluster has none now: those stages wait for a GPU "
                    "node; on a CPU-only machine pass --cpu", ", ".join(wanted))
    return cfg


# Whether this process started its own local Ray (then every config it runs is fitted to it).
_LOCAL = {"started": False}


def started_local() -> bool:
    """Whether this process started the local Ray it is connected to (one machine: no autoscaler, no node is
    ever drained or preempted)."""
    import ray

    return bool(_LOCAL["started"]) and ray.is_initialized()


def fit_here(cfg: MerConfig) -> MerConfig:
    """``cfg`` fitted to the local Ray this process started (unchanged on a joined cluster). A command that derives
    another config after :func:`init_ray` (``mer score --manifest`` adopts its run's feature settings, which may add
    stages) fits that one again, or its new pools would ask for CPUs the fitted ones already hold."""
    if not _LOCAL["started"]:
        return cfg

    fitted, note = fit_local(cfg, Cluster.current())
    if note and note != _LOCAL.get("note"):
        log.info("local Ray: %s", note)
        _LOCAL["note"] = note
    return fitted
