"""What a training run was trained on, and the checks that keep scoring from feeding it other features.

A run records its feature store's provenance (``_meta.json``: config hash, model ids, feature settings) as
``features`` in ``models/model.json``. Scoring a feature store checks the store's hash against it; scoring raw
videos extracts with the run's recorded settings. Where they cannot be matched, scoring refuses with a
:class:`~mer.extract.schema.FeatureConfigMismatch` naming the differing keys, unless the caller allows the
change (``mer score --allow-config-change``), which only logs them.
"""

from __future__ import annotations

import logging
from typing import Any

from mer.config import MerConfig
from mer.enrich.cache import default_cache_dir
from mer.extract.schema import FeatureConfigMismatch, apply_feature_settings, config_hash, differing, feature_settings
from mer.runs.layout import run_record
from mer.store import storage
from mer.store.parts import PartStore

log = logging.getLogger("mer.provenance")

ALLOW_HINT = "pass --allow-config-change (allow_config_change=True) to score it anyway"


def store_record(features: str | PartStore) -> dict[str, Any]:
    """A feature store's provenance as a run records it (``None`` values: the store's meta lacks them)."""
    store = PartStore.of(features)
    meta = store.meta or {}
    return {"uri": store.uri, "config_hash": meta.get("config_hash"), "model_ids": meta.get("model_ids"),
            "settings": meta.get("settings"), "enrich_cache": meta.get("enrich_cache"),
            "media_caches": meta.get("media_caches")}


def _recorded(run_uri: str) -> dict[str, Any] | None:
    rec = run_record(run_uri)
    if rec is None or rec.get("config_hash") is None:
        log.warning("run %s records no feature config hash (trained before runs recorded it, or on a store "
                    "without one): its input features cannot be checked", run_uri)
        return None
    return rec


def check_store(run_uri: str, features: str | PartStore, *, allow_config_change: bool = False) -> None:
    """Refuse to score the feature store ``features`` with ``run_uri`` when the store's config hash is not the one
    the run was trained on (the message names the differing settings); with ``allow_config_change`` only log it."""
    rec = _recorded(run_uri)
    if rec is None:
        return
    have = store_record(features)
    features_uri = have["uri"]
    if have["config_hash"] is None:
        log.warning("feature store %s records no config hash: not checked against run %s", features_uri, run_uri)
        return
    if have["config_hash"] == rec["config_hash"]:
        return
    msg = (f"run {run_uri} was trained on features with config hash {rec['config_hash']} ({rec.get('uri')}), "
           f"but feature store {features_uri} has config hash {have['config_hash']}: "
           f"{differing(rec, have, ('run', 'store'))}")
    if not allow_config_change:
        raise FeatureConfigMismatch(f"{msg}; score features extracted with the run's settings (mer score "
                                    f"--manifest extracts with them), or {ALLOW_HINT}")
    log.warning("%s; scoring anyway (config change allowed)", msg)


def extraction_config(cfg: MerConfig, run_uri: str, *, allow_config_change: bool = False) -> MerConfig:
    """The config to extract features for ``run_uri`` with: ``cfg`` with the run's recorded feature settings
    (logged when they differ from ``cfg``'s). With ``allow_config_change``, ``cfg`` as it is (the differences
    logged). Refuses when the run's settings cannot be reproduced (it records only a hash)."""
    rec = _recorded(run_uri)
    if rec is None or config_hash(cfg) == rec["config_hash"]:
        return cfg
    ours = {"settings": feature_settings(cfg)}
    diff = differing(rec, ours, ("run", "config"))
    if allow_config_change:
        log.warning("extracting for run %s with this config although the run was trained on other features "
                    "(config change allowed): %s", run_uri, diff)
        return cfg
    if rec.get("settings") is not None:
        adopted = apply_feature_settings(cfg, rec["settings"])
        if config_hash(adopted) == rec["config_hash"]:
            log.warning("extracting with run %s's recorded feature settings, not this config's: %s", run_uri, diff)
            return adopted
    raise FeatureConfigMismatch(
        f"run {run_uri} was trained on features with config hash {rec['config_hash']} ({rec.get('uri')}), but "
        f"this config hashes to {config_hash(cfg)} and the run's settings cannot be reproduced: {diff}; extract "
        f"with the run's settings, or {ALLOW_HINT}")


def enrich_cache_of(run_uri: str) -> str | None:
    """Where the LLM enrichment of ``run_uri``'s training store is cached: what the run recorded, else (runs
    recorded before the cache was) ``enrich_cache`` beside that store, the default; ``None`` when the run
    records no store, or that cache does not exist."""
    rec = run_record(run_uri) or {}
    cache = rec.get("enrich_cache")
    if not cache and rec.get("uri"):
        cache = default_cache_dir(None, rec["uri"])
    return cache if cache and storage.exists(cache) else None


def media_caches_of(run_uri: str) -> dict[str, str]:
    """Where the transcripts and descriptions of ``run_uri``'s training store are cached (``{"asr": …,
    "describe": …}``, the ones that exist): what the run recorded, else (runs recorded before) the default
    caches beside that store."""
    rec = run_record(run_uri) or {}
    recorded = rec.get("media_caches") or {}
    out = {}
    for stage in ("asr", "describe"):
        cache = recorded.get(stage) or (default_cache_dir(None, rec["uri"], f"{stage}_cache") if rec.get("uri")
                                        else None)
        if cache and storage.exists(cache):
            out[stage] = cache
    return out
