"""``mer demo``: the whole loop on generated data with tiny models and local Ray.

synth → (label noise, as real annotations have) → extract (+ LLM enrichment) → train each single modality and
the ECMF fusion → refine labels → pseudo-label round → score → evaluate, then a WAF table and
``<workdir>/summary.json``. Every step is resumable, so a second ``make demo`` reuses what is done.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from mer import storage
from mer.config import BRANCHES, LABELS, MerConfig

log = logging.getLogger("mer.demo")

# Laptop scale for the demo (applied before the user's --set flags, which win): small frames for the tiny
# 64-px models, and fractional CPUs so decode, face and four encoder actors fit on a 2-core local Ray
# (whole-CPU actors would leave most stages pending forever there).
DEMO_OVERRIDES: list[str] = [
    "extract.decode.num_frames=8",
    "extract.decode.frame_size=64",
    "extract.decode.resources.concurrency=1",
    "extract.decode.resources.num_cpus=0.5",
    "extract.face.resources.num_cpus=0.25",
    *[f"extract.encoders.{b}.resources.num_cpus=0.25" for b in BRANCHES],
    # One worker per fold, the three folds at once on half a CPU each: on 2 cores a fold is mostly Ray Train
    # and DeepSpeed start-up, which overlaps well (a 300-clip run: 133 s with two workers and folds in turn,
    # 94 s with one worker, 58-66 s with the folds in parallel; 6 concurrent 2-worker folds were slower than
    # sequential). The test suite runs the 2-worker DeepSpeed path.
    "train.folds=3",
    "train.num_workers=1",
    "train.parallel_folds=3",
    "train.cpus_per_worker=0.5",
    "train.max_epochs=20",
    "train.patience=5",
    # Each per-epoch report waits for the controller's next poll: at 0.5 s that is ~40 % of a tiny epoch.
    "train.poll_interval_s=0.1",
    # A random-weight LLM decoded greedily repeats one token (often a byte piece that cleans to nothing);
    # seeded sampling makes it write varied noise the fusion must learn to down-weight.
    "enrich.temperature=1.0",
    "score.num_cpus=0.5",
]


def inject_label_noise(manifest: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, int]:
    """Flip ``fraction`` of the train split's labels to another class (simulated annotator noise)."""
    rng = random.Random(seed)
    labels = manifest.column("label").to_pylist()
    splits = manifest.column("split").to_pylist()
    train_idx = [i for i, s in enumerate(splits) if s == "train" and labels[i] is not None]
    flipped = rng.sample(train_idx, int(round(fraction * len(train_idx))))
    for i in flipped:
        labels[i] = rng.choice([lab for lab in LABELS if lab != labels[i]])
    idx = manifest.column_names.index("label")
    return manifest.set_column(idx, "label", pa.array(labels, pa.string())), len(flipped)


def _test_metrics(metrics: dict) -> tuple[float, float]:
    test = metrics.get("test") or {}
    return float(test.get("waf", float("nan"))), float(test.get("accuracy", float("nan")))


def run_demo(cfg: MerConfig, workdir: str, *, n_train: int = 150, n_unlabeled: int = 90, n_test: int = 90,
             label_noise: float = 0.15, seed: int = 0, enrich: bool = True) -> dict[str, Any]:
    """Run the demo loop into ``workdir`` and return (and write) its summary.

    With ``enrich`` the tiny LLM enriches every subtitle and the text branch encodes both the original and
    the enriched transcript (a random-weight LLM writes noise, so the fusion must learn to weigh it).
    """
    from mer.data.manifest import read_manifest, write_manifest
    from mer.data.synth import synth_dataset
    from mer.enrich.run import enrich_manifest
    from mer.evaluate import evaluate
    from mer.extract.pipeline import extract_features
    from mer.labels.pseudolabel import pseudolabel_rounds
    from mer.labels.relabel import relabel_run
    from mer.models.tiny import ensure_tiny_models
    from mer.runtime import init_ray
    from mer.score import score
    from mer.train import train_run
    from mer.train.features import store_columns

    if enrich:
        cfg = cfg.model_copy(update={"enrich": cfg.enrich.model_copy(update={"enabled": True,
                                                                             "text_source": "both"})})
    t0 = time.time()
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        print(f"[demo] {name}: {timings[name]} s", flush=True)

    t = time.time()
    ensure_tiny_models(cfg)
    data = wd / "data"
    if not (data / "manifest.parquet").exists():
        synth_dataset(data, n_train=n_train, n_unlabeled=n_unlabeled, n_test=n_test, seed=seed)
    noisy_uri = str(wd / "manifest_noisy.parquet")
    if not Path(noisy_uri).exists():
        noisy, n_flipped = inject_label_noise(read_manifest(str(data / "manifest.parquet")), label_noise, seed)
        write_manifest(noisy, noisy_uri)
        storage.write_json(str(wd / "label_noise.json"), {"fraction": label_noise, "flipped": n_flipped})
    step("data", t)

    init_ray(cfg)
    enrich_summary: dict[str, Any] = {}
    if cfg.enrich.enabled:
        # Enrich first as its own job: the vLLM engine then has the CPUs to itself, and extraction's
        # enrichment stage finds every transcript in the shared cache (<workdir>/enrich_cache).
        t = time.time()
        enrich_summary = enrich_manifest(cfg, noisy_uri, str(wd / "enriched.parquet"))
        step("enrich", t)
    t = time.time()
    features = str(wd / "features")
    extract_summary = extract_features(cfg, noisy_uri, features)
    step("extract", t)

    # Ablation on the labelled split only: each single modality, then the fusion of all.
    store_cols = store_columns(features)
    fused_mods = [m for m in (*BRANCHES, "text_enriched") if m in store_cols]
    settings = {m: [m] for m in BRANCHES} | {"fused": fused_mods}
    waf: dict[str, float] = {}
    acc: dict[str, float] = {}
    runs = wd / "runs"
    for name, mods in settings.items():
        t = time.time()
        metrics = train_run(cfg, features, str(runs / name), resume=True, modalities=mods)
        waf[name], acc[name] = _test_metrics(metrics)
        step(f"train {name}", t)

    t = time.time()
    refined_uri = str(wd / "labels" / "refined.parquet")
    relabel_summary = relabel_run(cfg, str(runs / "fused"), features, refined_uri)
    refined_metrics = train_run(cfg, features, str(runs / "refined"), resume=True, labels_uri=refined_uri,
                                modalities=fused_mods)
    step("relabel + retrain", t)

    t = time.time()
    pseudo = pseudolabel_rounds(cfg.model_copy(update={"train": cfg.train.model_copy(update={"modalities": fused_mods})}),
                                features, str(wd / "pseudo"), base_run=str(runs / "refined"),
                                labels_uri=refined_uri, rounds=1)
    pseudo_metrics = storage.read_json(str(Path(pseudo["final_run"]) / "metrics.json"))
    step("pseudo-label round", t)

    t = time.time()
    scored = score(cfg, pseudo["final_run"], str(wd / "scores"), features_uri=features)
    report = evaluate(scored["predictions"], str(data / "test_labels.csv"), out_dir=str(wd / "eval"))
    step("score + evaluate", t)

    stages = {
        "labelled_only": _test_metrics(storage.read_json(str(runs / "fused" / "metrics.json")))[0],
        "after_refinement": _test_metrics(refined_metrics)[0],
        "after_pseudo_labels": _test_metrics(pseudo_metrics)[0],
    }
    summary = {
        "waf": waf,
        "accuracy": acc["fused"],
        "accuracy_by_setting": acc,
        "label_stages_waf": stages,
        "scored_test": {"waf": report.get("waf"), "accuracy": report.get("accuracy"),
                        "missing": len(report["missing_in_pred"])},
        "relabel": relabel_summary["rules"],
        "pseudo_labels": pseudo["rounds"][-1]["selected"] if pseudo["rounds"] else 0,
        "extract_status": extract_summary.get("status_counts", {}).get("status", {}),
        "enrich_status": enrich_summary.get("status_counts", {}),
        "timings_s": timings,
        "seconds": round(time.time() - t0, 1),
        "outputs": {"features": features, "runs": str(runs), "predictions": scored["predictions"],
                    "submission": scored["submission"], "evaluation": str(wd / "eval")},
    }
    storage.write_json(str(wd / "summary.json"), summary)
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing tables."""
    lines = ["", "Test-split WAF by modality (labelled-only training, k-fold ensemble)",
             f"{'setting':<16}{'WAF':>8}{'acc':>8}"]
    for name, w in summary["waf"].items():
        lines.append(f"{name:<16}{w:>8.4f}{summary['accuracy_by_setting'][name]:>8.4f}")
    lines += ["", "Fused WAF through the label stages", f"{'stage':<22}{'WAF':>8}"]
    for name, w in summary["label_stages_waf"].items():
        lines.append(f"{name:<22}{w:>8.4f}")
    lines += ["", f"relabel rules: {json.dumps(summary['relabel'])}",
              f"pseudo-labels selected: {summary['pseudo_labels']}",
              f"extraction statuses: {json.dumps(summary['extract_status'])}",
              f"enrichment statuses: {json.dumps(summary['enrich_status'])}",
              f"scored test split: WAF {summary['scored_test']['waf']}, "
              f"accuracy {summary['scored_test']['accuracy']}",
              f"total {summary['seconds']} s", "outputs:"]
    lines += [f"  {k:<12}{v}" for k, v in summary["outputs"].items()]
    return "\n".join(lines)
