"""``mer demo``: the whole loop on generated data with tiny models and local Ray.

synth (an unlabelled pool 2.5x the labelled set, as in MER2025) → label noise (as real annotations have) → a few
subtitles removed → LLM enrichment → extract (speech recognition of the clips without a subtitle, visual
descriptions of every clip, the enrichment of the new transcripts, in the same stream) → an LLM label vote on the
store's transcripts and descriptions → the label loop (the ECMF fusion and each single modality as
independent label sources, refinement, pseudo-label rounds, each stage kept only if its gate says it helps) →
score with the best accepted stage → evaluate, then the WAF tables and ``<workdir>/summary.json``. Every step
is resumable, so a second ``make demo`` reuses what is done.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from mer.config import BRANCHES, LABELS, MerConfig, TEXT_MODALITIES
from mer.data.manifest import read_manifest, write_manifest
from mer.enrich.run import enrich_manifest
from mer.evaluation.evaluate import evaluate
from mer.evaluation.report import write_demo_report
from mer.extract.pipeline import extract_features
from mer.labels.llm_vote import llm_vote
from mer.labels.loop import label_loop
from mer.labels.relabel import table_folds
from mer.models.tiny import ensure_tiny_models
from mer.predict.score import score
from mer.runtime.session import init_ray
from mer.store import storage
from mer.synth.dataset import synth_dataset
from mer.train.ablation import run_figures
from mer.train.stack import candidate_label

log = logging.getLogger("mer.demo")

# Laptop scale for the demo (applied before the user's --set flags, which win): small frames for the tiny
# 64-px models, fewer folds and epochs. CPU/GPU placement is not set here: like every command on a local Ray,
# the demo's stages are fitted to the machine (mer.runtime.placement).
DEMO_OVERRIDES: list[str] = [
    "extract.decode.num_frames=8",
    "extract.decode.frame_size=64",
    # One worker, the three folds in turn in its worker group: on 2 cores a fold is mostly Ray Train and
    # DeepSpeed start-up, which one group pays once (a 300-clip run with a trainer per fold: 133 s with two
    # workers and folds in turn, 94 s with one worker, 58-66 s with the folds in parallel). The test suite runs
    # the 2-worker DeepSpeed path.
    "train.folds=3",
    "train.resources.concurrency=1",
    "train.parallel_folds=1",
    "train.max_epochs=20",
    "train.patience=5",
    # Each per-epoch report waits for the controller's next poll: at 0.5 s that is ~40 % of a tiny epoch.
    "train.poll_interval_s=0.1",
    # The tiny LLM enriches every subtitle; the text branch encodes both the original and the enriched one.
    "enrich.enabled=true",
    "enrich.text_source=both",
    # A random-weight LLM decoded greedily repeats one token (often a byte piece that cleans to nothing);
    # seeded sampling makes it write varied noise the fusion must learn to down-weight.
    "enrich.temperature=1.0",
    # An eager engine: compiling the tiny LLM at the engine's start (a fresh checkout has no compile cache) cost
    # more than its whole enrichment.
    "enrich.enforce_eager=true",
    # Text from the video itself: clips without a subtitle are transcribed (tiny Whisper), every clip's keyframes
    # described (tiny vision-language model), both inside the extraction stream. Random weights: sampled, like the
    # enrichment, since their greedy answer is an end token; eager engines (no compilation at start-up).
    "text.source=auto",
    "extract.describe.enabled=true",
    *[f"extract.{stage}.{key}" for stage in ("asr", "describe")
      for key in ("temperature=1.0", "max_tokens=16", "enforce_eager=true")],
    "extract.describe.max_model_len=1024",
    # ...and the fusion gets both text vectors and the visual description.
    f"train.modalities=[{','.join([*BRANCHES, *TEXT_MODALITIES])}]",
    # The label loop's independent sources, the ablation table: one run per branch and per visual description
    # (the enriched-text vector of a random-weight LLM is noise, and is already one of the fused run's modalities).
    "labels.source_modalities=[global_visual,face,audio,text,visual_description]",
]
# Clips whose subtitle the demo removes, so that the speech stage transcribes them (text.source auto).
DEMO_UNSUBTITLED = 12
# Short, small clips: the loop needs an unlabelled pool 2.5x the labelled set, not long videos.
DEMO_CLIP_SECONDS = 1.5
DEMO_CLIP_SIZE = 96


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


def remove_subtitles(manifest: pa.Table, n: int, seed: int) -> tuple[pa.Table, list[str]]:
    """``manifest`` with the subtitles of ``n`` clips (drawn from every split) set to null."""
    rng = random.Random(seed + 1)
    ids = manifest.column("clip_id").to_pylist()
    gone = set(rng.sample(ids, min(n, len(ids))))
    texts = [None if c in gone else t for c, t in zip(ids, manifest.column("text").to_pylist())]
    idx = manifest.column_names.index("text")
    return manifest.set_column(idx, "text", pa.array(texts, pa.string())), sorted(gone)


def video_text_summary(features: str, extract_summary: dict[str, Any]) -> dict[str, Any]:
    """What the speech and description stages did in the demo's extraction: statuses, where the transcripts
    came from, busy seconds and generated tokens."""
    from mer.store.parts import read_parts

    t = read_parts(features, columns=["transcript_source", "asr_status", "describe_status"])

    def counts(c: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in t.column(c).to_pylist():
            out[str(v)] = out.get(str(v), 0) + 1
        return out

    busy = extract_summary.get("stage_busy_s", {})
    return {"transcript_source": counts("transcript_source"), "asr_status": counts("asr_status"),
            "describe_status": counts("describe_status"),
            "busy_s": {k: busy[k] for k in ("asr", "describe", "enrich") if k in busy},
            "tokens": extract_summary.get("stage_tokens", {})}


def _truth(data_dir: Path) -> dict[str, str]:
    """The generator's hidden label of every clip (``synth_truth.csv``), unlabelled ones included."""
    import csv

    with open(data_dir / "synth_truth.csv", newline="") as f:
        return {r["name"]: r["label"] for r in csv.DictReader(f)}


def _label_quality(loop: dict[str, Any], truth: dict[str, str]) -> dict[str, Any]:
    """What the demo can say because it knows the truth: flipped labels found, pseudo-labels right."""
    out: dict[str, Any] = {}
    for s in loop["stages"]:
        if s["stage"] == "refined":
            table = storage.read_table(s["labels"])
            rows, n = table.to_pylist(), table_folds(table)
            # decided once per fold: (clip, fold) pairs, counted per fold
            flipped = {(r["clip_id"], r.get("fold")) for r in rows if r["original_label"] != truth[r["clip_id"]]}
            flagged = {(r["clip_id"], r.get("fold")) for r in rows if r["rule"] in ("relabel", "downweight")}
            out["refinement"] = {"flipped": round(len(flipped) / n), "flagged": round(len(flagged) / n),
                                 "flagged_and_flipped": round(len(flipped & flagged) / n)}
        elif s["stage"].startswith("round_") and s.get("selection"):
            sel = storage.read_table(s["selection"])
            picked = sel.filter(sel.column("selected"))
            right = sum(truth[c] == lab for c, lab in zip(picked.column("clip_id").to_pylist(),
                                                          picked.column("pred_label").to_pylist()))
            out[s["stage"]] = {"pseudo_labels": picked.num_rows, "right": right}
    return out


def run_demo(cfg: MerConfig, workdir: str, *, n_train: int = 120, n_unlabeled: int = 300, n_test: int = 300,
             label_noise: float = 0.15, seed: int = 0) -> dict[str, Any]:
    """Run the demo loop into ``workdir`` with ``cfg`` (``mer demo`` resolves it with :data:`DEMO_OVERRIDES`)
    and return (and write) its summary.

    MER proportions: an unlabelled pool 2.5x the labelled train split, 15 % of the train labels flipped. The
    test split is the judge of every stage in the tables, and is larger than MER's proportions would make it: on
    90 clips a WAF moves by ±0.05 from one draw to the next, more than the label stages' effects; on 300, ±0.03. With
    ``enrich.enabled`` the tiny LLM enriches every subtitle and votes a label for every clip (an LLM label
    source); a random-weight LLM writes noise, so the fusion must learn to weigh it and the loop to give its
    votes no say.
    """
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
        synth_dataset(data, n_train=n_train, n_unlabeled=n_unlabeled, n_test=n_test, seed=seed,
                      seconds=DEMO_CLIP_SECONDS, size=DEMO_CLIP_SIZE)
    noisy_uri = str(wd / "manifest_noisy.parquet")
    if not Path(noisy_uri).exists():
        noisy, n_flipped = inject_label_noise(read_manifest(str(data / "manifest.parquet")), label_noise, seed)
        noisy, unsubtitled = remove_subtitles(noisy, DEMO_UNSUBTITLED if cfg.text.source != "subtitle" else 0, seed)
        write_manifest(noisy, noisy_uri)
        storage.write_json(str(wd / "label_noise.json"), {"fraction": label_noise, "flipped": n_flipped,
                                                          "subtitles_removed": unsubtitled})
    step("data", t)

    cfg = init_ray(cfg)
    enrich_summary: dict[str, Any] = {}
    vote_summary: dict[str, Any] = {}
    tables: dict[str, str] = {}
    if cfg.enrich.enabled:
        # Enrich the subtitles first as their own job: the vLLM engine then has the CPUs to itself, and
        # extraction's enrichment finds them in the shared cache (<workdir>/enrich_cache); only the transcripts
        # the speech stage writes are enriched inside the stream.
        t = time.time()
        enrich_summary = enrich_manifest(cfg, noisy_uri, str(wd / "enriched.parquet"))
        step("enrich", t)
    t = time.time()
    features = str(wd / "features")
    extract_summary = extract_features(cfg, noisy_uri, features)
    step("extract", t)
    video_text = video_text_summary(features, extract_summary)
    if cfg.enrich.enabled:
        # The vote reads each clip's transcript (subtitle or speech recognition), its enriched description and
        # its visual description from the store.
        t = time.time()
        votes_uri = str(wd / "llm_votes.parquet")
        vote_summary = llm_vote(cfg, None, votes_uri, features_uri=features)
        tables["llm"] = votes_uri
        step("llm vote", t)

    # The label loop trains the fused run and one run per modality (the independent label sources, and the
    # ablation table), refines the labels, runs the pseudo-label rounds and keeps only what its gate accepts.
    t = time.time()
    loop = label_loop(cfg, features, str(wd / "labels"), tables=tables)
    step("label loop", t)

    t = time.time()
    scored = score(cfg, str(wd / "labels"), str(wd / "scores"), features_uri=features)
    report = evaluate(scored["predictions"], str(data / "test_labels.csv"), out_dir=str(wd / "eval"))
    step("score + evaluate", t)

    stages = {s["stage"]: s for s in loop["stages"]}
    # The loop's source runs are the ablation: each modality alone, then fused.
    runs = storage.read_json(str(wd / "labels" / "sources" / "reliability.json"))["runs"]
    figures = run_figures({**{m: runs[m] for m in runs if m != "fused"}, "fused": runs["fused"]})
    waf = {name: f["waf"] for name, f in figures.items()}
    acc = {name: f["accuracy"] for name, f in figures.items()}
    summary = {
        "waf": waf,
        "accuracy": acc["fused"],
        "accuracy_by_setting": acc,
        "label_stages_waf": {name: (s["test"] or {}).get("waf") for name, s in stages.items()},
        "label_stages": [{"stage": s["stage"], "test_waf": (s["test"] or {}).get("waf"),
                          "gate_waf": (s["gate"] or {}).get("waf"),
                          "accepted": s["accepted"], "decision": s["decision"],
                          **({"rules": s["rules"]} if "rules" in s else {}),
                          **({"pseudo_labels": s["pseudo"]["selected"]} if "pseudo" in s else {})}
                         for s in loop["stages"]]
        + ([{"stage": "ensemble", "test_waf": (loop["best"].get("test") or {}).get("waf"),
             "gate_waf": loop["best"]["gate_waf"], "accepted": True,
             "decision": "scored: mean of " + ", ".join(loop["best"]["members"])}]
           if loop["best"]["stage"] == "ensemble" else [])
        + ([{"stage": loop["best"]["stage"], "test_waf": (loop["best"].get("test") or {}).get("waf"),
             "gate_waf": loop["best"]["gate_waf"], "accepted": True,
             "decision": "shipped: best out-of-fold WAF over fused, stacked and single runs"}]
           if loop["best"]["stage"] in ("stacked", *(f"single_{m}" for m in runs)) else []),
        "best_stage": loop["best"],
        "label_quality": _label_quality(loop, _truth(data)),
        "scored_test": {"waf": report.get("waf"), "accuracy": report.get("accuracy"),
                        "missing": len(report["missing_in_pred"]), "run": scored.get("run")},
        "extract_status": extract_summary.get("status_counts", {}).get("status", {}),
        "enrich_status": enrich_summary.get("status_counts", {}),
        "video_text": video_text,
        "llm_vote_status": vote_summary.get("status_counts", {}),
        "timings_s": timings,
        "seconds": round(time.time() - t0, 1),
        "outputs": {"features": features, "label_loop": str(wd / "labels"), "predictions": scored["predictions"],
                    "submission": scored["submission"], "evaluation": str(wd / "eval")},
    }

    summary["outputs"]["report"] = write_demo_report(str(wd), summary)
    storage.write_json(str(wd / "summary.json"), summary)
    print(format_summary(summary))
    return summary


def video_text_lines(v: dict[str, Any]) -> list[str]:
    """The console lines of the speech and description stages (random-weight tiny models: no emotion in them)."""
    if not v:
        return []
    return [f"transcripts from: {json.dumps(v['transcript_source'])}; speech recognition: "
            f"{json.dumps(v['asr_status'])}",
            f"visual descriptions: {json.dumps(v['describe_status'])}; in the stream, busy s "
            f"{json.dumps(v['busy_s'])}, generated tokens {json.dumps(v['tokens'])}"]


def _figure(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing tables."""
    width = max(16, *(len(name) + 2 for name in summary["waf"]))  # visual_description is 18 characters
    lines = ["", "Test-split WAF by modality (labelled-only training, k-fold ensemble)",
             f"{'setting':<{width}}{'WAF':>8}{'acc':>8}"]
    for name, w in summary["waf"].items():
        lines.append(f"{name:<{width}}{w:>8.4f}{summary['accuracy_by_setting'][name]:>8.4f}")
    lines += ["", "Fused model through the label stages (gate: out-of-fold WAF vs the original labels)",
              f"{'stage':<16}{'test WAF':>9}{'gate WAF':>9}  decision"]
    for s in summary["label_stages"]:
        what = ("kept" if s["accepted"] else "REJECTED") + f" ({s['decision']})"
        extra = (f"; rules {json.dumps(s['rules'])}" if "rules" in s else
                 f"; {s['pseudo_labels']} pseudo-labels" if "pseudo_labels" in s else "")
        fig = "".join(_figure(v).rjust(9) for v in (s["test_waf"], s["gate_waf"]))
        lines.append(f"{s['stage']:<16}{fig}  {what}{extra}")
    best, scored = summary["best_stage"], summary["scored_test"]
    sel = best.get("selection")
    if sel:
        lines.append("what ships (out-of-fold WAF vs the original labels; test WAF shown, never used to choose): "
                     + ", ".join(f"{candidate_label(c['kind'], c['name'])} {c['oof_waf']:.4f}/{_figure(c.get('test_waf'))}"
                                 for c in sel["candidates"]))
    lines += [f"scored with: {best['stage']} ({best['why']})",
              f"label quality vs the generator's truth: {json.dumps(summary['label_quality'])}",
              "", f"extraction statuses: {json.dumps(summary['extract_status'])}",
              f"enrichment statuses: {json.dumps(summary['enrich_status'])}",
              *video_text_lines(summary.get("video_text") or {}),
              f"LLM vote statuses: {json.dumps(summary['llm_vote_status'])}",
              f"scored test split: WAF {_figure(scored.get('waf'))}, accuracy {_figure(scored.get('accuracy'))}",
              f"total {summary['seconds']} s", "outputs:"]
    lines += [f"  {k:<12}{v}" for k, v in summary["outputs"].items()]
    return "\n".join(lines)
