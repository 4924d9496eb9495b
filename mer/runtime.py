"""Process set-up shared by the CLI and ``jobs/``: Ray connection, storage and cache locations."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mer import storage
from mer.config import MerConfig, gpu_requests

log = logging.getLogger("mer")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _job_env_vars() -> dict[str, str] | None:
    """The env_vars of the submitted job's runtime_env, or None outside ``ray job submit``."""
    blob = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not blob:
        return None
    try:
        return dict((json.loads(blob).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def init_ray(cfg: MerConfig, **extra: Any) -> None:
    """Connect to Ray: the configured address, the cluster of a submitted job, or a new local instance.

    Inside ``ray job submit`` RAY_ADDRESS is set, so ``ray.init()`` with no address joins that cluster; the
    job's runtime_env already carries its env_vars to every worker, and Ray refuses a driver runtime_env that
    repeats one of its keys, so only the variables the job did not set are added.
    """
    import ray

    storage.configure(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    if ray.is_initialized():
        return
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
        if cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        if cfg.ray.object_store_memory is not None:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory
    kwargs.update(extra)
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.ray.target_max_block_size
    resources = ray.cluster_resources()
    log.info("ray resources: %s", resources)
    wanted = gpu_requests(cfg)
    if wanted and not resources.get("GPU"):
        # Not an error: an autoscaling cluster may add GPU nodes once the stages ask for them.
        log.warning("the config requests GPUs (%s) but the Ray cluster has none now: those stages wait for a GPU "
                    "node; on a CPU-only machine pass --cpu", ", ".join(wanted))
