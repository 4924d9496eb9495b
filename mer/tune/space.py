"""The search space of ``mer tune``: ``tune.space`` as Ray Tune samplers, and a trial's config from its values."""

from __future__ import annotations

import json
from typing import Any

from mer.config import MerConfig, TuneConfig, deep_merge, with_overrides


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """Ray Tune ``param_space``: one sampler per searched ``train`` key (dotted names kept as they are)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, (kind, *args) in tc.dimensions.items():
        if kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        else:  # randint: the config's high is inclusive, Tune's exclusive
            out[key] = tune.randint(args[0], args[1] + 1)
    return out


def train_value(cfg: MerConfig, key: str) -> Any:
    """The value of dotted ``train`` key ``key`` in ``cfg``."""
    node: Any = cfg.train.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def default_point(cfg: MerConfig) -> dict[str, Any]:
    """The train section's own values of every searched key: the study's baseline trial."""
    return {key: train_value(cfg, key) for key in cfg.tune.dimensions}


def trial_config(cfg: MerConfig, params: dict[str, Any]) -> MerConfig:
    """``cfg`` with ``tune.train`` merged into ``train``, then a trial's sampled ``params`` (validated)."""
    base = with_overrides(cfg, [f"train={json.dumps(deep_merge(cfg.train.model_dump(mode='json'), cfg.tune.train))}"])
    return with_overrides(base, [f"train.{k}={json.dumps(_plain(v))}" for k, v in sorted(params.items())])


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's samplers) as plain Python values."""
    return v.item() if hasattr(v, "item") else v


def trial_cpus_gpus(cfg: MerConfig) -> tuple[float, float]:
    """CPUs and GPUs one trial holds while all its folds that run at once train (``cfg``: a trial's config)."""
    tc = cfg.train
    groups = min(tc.parallel_folds, tc.folds)
    r = tc.resources
    return cfg.tune.trial_cpus + groups * r.concurrency * r.num_cpus, groups * r.concurrency * r.num_gpus
