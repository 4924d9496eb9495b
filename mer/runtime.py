"""Process set-up shared by the CLI and ``jobs/``: Ray connection, storage and cache locations."""

from __future__ import annotations

import logging
import os
from typing import Any

from mer import storage
from mer.config import MerConfig

log = logging.getLogger("mer")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(cfg: MerConfig, **extra: Any) -> None:
    """Connect to Ray: the configured address, the cluster of a submitted job, or a new local instance.

    Inside ``ray job submit`` RAY_ADDRESS is set, so ``ray.init()`` with no address joins that cluster.
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
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
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
    log.info("ray resources: %s", ray.cluster_resources())
