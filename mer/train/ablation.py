"""Ablation: each single modality vs. the fusion of all, same protocol, test-split WAF per setting."""

from __future__ import annotations

from mer.config import MerConfig
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.run import train_run


def ablation_table(cfg: MerConfig, features_uri: str | PartStore, out_uri: str) -> dict[str, float]:
    """Train each modality of ``cfg.train.modalities`` present in the store alone, then all fused.

    Returns ``{setting: WAF}`` (test split when labelled, else out-of-fold), also written to
    ``<out>/ablation.json``; each setting's run lives in ``<out>/<setting>`` and is resumed if present.
    """
    store = PartStore.of(features_uri)  # opened once for every setting's run
    mods = [m for m in cfg.train.modalities if m in store.columns]
    if not mods:
        raise ValueError(f"none of {cfg.train.modalities} in feature store {store.uri}")
    settings = {m: [m] for m in mods}
    settings["fused"] = mods
    runs = {name: storage.join(out_uri, name) for name in settings}
    for name, ms in settings.items():
        train_run(cfg, store, runs[name], resume=True, modalities=ms)
    table = {name: f["waf"] for name, f in run_figures(runs).items()}
    storage.write_json(storage.join(out_uri, "ablation.json"), table)
    print(format_ablation(table))
    return table


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
