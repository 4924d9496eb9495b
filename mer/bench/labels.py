"""``mer bench labels``: does the label loop pay off? Generated feature stores, several seeds, true labels known.

Each seed writes a generated store (:func:`mer.synth.feature_store.make_feature_store`: a labelled train split
with ``label_noise`` of its labels flipped, an unlabelled pool ``pool_ratio`` times larger, a labelled test
split), runs the whole loop (:func:`mer.labels.loop.label_loop`) and compares, on the test split the loop never
sees: labelled-only vs refined vs each pseudo-label round vs the best accepted stage (the one ``mer score``
would use). It also scores refinement at finding the flipped labels (precision/recall of the clips it
relabels or down-weights, and how many relabels restore the true label) and the precision of the
pseudo-labels. Features only — no video — so it runs in minutes on a laptop.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mer.config import MerConfig, with_overrides
from mer.evaluation.evaluate import read_labels
from mer.labels.loop import label_loop
from mer.labels.relabel import table_folds
from mer.labels.sources import parse_sources
from mer.store import storage
from mer.store.parts import read_parts
from mer.synth.feature_store import make_feature_store

# Laptop-scale training for the bench (applied before the user's --set flags): 3 folds in turn in one worker
# group of one worker, as the demo does on 2 cores.
BENCH_OVERRIDES: list[str] = [
    "train.folds=3", "train.resources.concurrency=1", "train.parallel_folds=1", "train.resources.num_cpus=0.5",
    "train.max_epochs=20", "train.patience=5", "train.poll_interval_s=0.1", "score.resources.num_cpus=0.5",
    # This bench measures the label stages (the best accepted stage against labelled-only training); what ships
    # over the stacked and single runs is `mer bench fusion`'s subject.
    "labels.select_final=false",
]
STORE = {"dims": {"global_visual": 32, "face": 24, "audio": 16, "text": 24}, "missing": 0.1}


def _truth(root: str, seed: int, n: int, noise: float, test_frac: float) -> dict[str, str]:
    """Every clip's true label: the same generator arguments without flips or unlabelled split."""
    clone = storage.join(root, "truth")
    if not storage.exists(storage.join(clone, "_meta.json")):
        make_feature_store(clone, n=n, dims=STORE["dims"], seed=seed, noise=noise, missing=STORE["missing"],
                           test_frac=test_frac, unlabeled_frac=0.0, label_noise=0.0)
    t = read_parts(clone, columns=["label"])
    return dict(zip(t.column("clip_id").to_pylist(), t.column("label").to_pylist()))


def _refinement_scores(labels_uri: str, truth: dict[str, str]) -> dict[str, Any]:
    table = storage.read_table(labels_uri)
    rows, n = table.to_pylist(), table_folds(table)
    # A per-fold table decides every clip once per fold: (clip, fold) pairs, counts given per fold.
    flipped = {(r["clip_id"], r.get("fold")) for r in rows if r["original_label"] != truth[r["clip_id"]]}
    flagged = {(r["clip_id"], r.get("fold")) for r in rows if r["rule"] in ("relabel", "downweight")}
    relabelled = [r for r in rows if r["rule"] == "relabel"]
    hit = len(flipped & flagged)
    return {"flipped": round(len(flipped) / n), "flagged": round(len(flagged) / n),
            "relabelled": round(len(relabelled) / n),
            "flip_precision": hit / len(flagged) if flagged else None,
            "flip_recall": hit / len(flipped) if flipped else None,
            "relabel_correct": (sum(r["label"] == truth[r["clip_id"]] for r in relabelled) / len(relabelled)
                                if relabelled else None),
            "label_accuracy_before": float(np.mean([r["original_label"] == truth[r["clip_id"]] for r in rows])),
            "label_accuracy_after": float(np.mean([r["label"] == truth[r["clip_id"]] for r in rows])),
            # what training sees: the share of the sample weight that sits on right labels (all weights 1 before)
            "right_weight_after": float(sum(r["weight"] for r in rows if r["label"] == truth[r["clip_id"]])
                                        / sum(r["weight"] for r in rows))}


def _pseudo_precision(selection_uri: str, truth: dict[str, str]) -> float | None:
    sel = storage.read_table(selection_uri)
    picked = sel.filter(sel.column("selected"))
    if not picked.num_rows:
        return None
    return float(np.mean([truth[c] == lab for c, lab in zip(picked.column("clip_id").to_pylist(),
                                                           picked.column("pred_label").to_pylist())]))


def _loop_figures(loop: dict[str, Any], truth: dict[str, str] | None) -> dict[str, Any]:
    """Test-split WAF of every trained stage of a finished loop, the gate's decisions, the gain over
    labelled-only of what ``mer score`` uses (``best``: the best stage or the accepted stages' ensemble) and of
    the best single stage; with ``truth`` ({clip_id: true label}) also the refinement's flip scores and the
    pseudo-labels' precision."""
    stages = {s["stage"]: s for s in loop["stages"] if s["run"]}  # a round with no pool trains nothing
    best, best_stage = loop["best"], loop["best_stage"]
    out: dict[str, Any] = {"test_waf": {name: s["test"]["waf"] for name, s in stages.items()},
                           "gate_waf": {name: s["gate"]["waf"] for name, s in stages.items()},
                           "accepted": {name: s["accepted"] for name, s in stages.items()},
                           "best": best["stage"], "best_stage": best_stage["stage"]}
    lo = out["test_waf"]["labelled_only"]
    out["best_stage_test_waf"] = stages[best_stage["stage"]]["test"]["waf"]
    out["final_test_waf"] = best["test"]["waf"] if best["stage"] == "ensemble" else out["best_stage_test_waf"]
    out["gain"] = out["final_test_waf"] - lo
    out["gain_best_stage"] = out["best_stage_test_waf"] - lo
    refined = next((s for s in loop["stages"] if s["stage"] == "refined" and s.get("labels")), None)
    if truth is not None and refined is not None:  # also when its labels changed no training row (not trained)
        out["refinement"] = _refinement_scores(refined["labels"], truth)
    out["pseudo_precision"] = {}
    out["pseudo_selected"] = {}
    for name, s in stages.items():
        if name.startswith("round_"):
            out["pseudo_precision"][name] = _pseudo_precision(s["selection"], truth) if truth else None
            out["pseudo_selected"][name] = s["pseudo"]["selected"]
    return out


def bench_seed(cfg: MerConfig, root: str, seed: int, *, n_train: int, pool_ratio: float, n_test: int,
               noise: float, label_noise: float) -> dict[str, Any]:
    """One seed: generated store → label loop → test-split figures per stage, flip and pseudo-label scores."""
    n_pool = int(round(pool_ratio * n_train))
    n = n_train + n_pool + n_test
    features = storage.join(root, "features")
    if not storage.exists(storage.join(features, "_meta.json")):
        make_feature_store(features, n=n, dims=STORE["dims"], seed=seed, noise=noise, missing=STORE["missing"],
                           test_frac=n_test / n, unlabeled_frac=n_pool / n, label_noise=label_noise)
    truth = _truth(root, seed, n, noise, n_test / n)
    t0 = time.time()
    loop = label_loop(cfg, features, storage.join(root, "loop"))
    return {"seed": seed, "seconds": round(time.time() - t0, 1), **_loop_figures(loop, truth)}


def bench_store(cfg: MerConfig, features_uri: str, out_dir: str, *, seeds: list[int],
                tables: dict[str, str] | None = None, truth_uri: str | None = None) -> dict[str, Any]:
    """The label loop on an existing feature store (its labelled ``test`` split is the judge), once per seed:
    ``train.seed`` draws other folds and initialisations, so the spread is the loop's own, not the store's.
    ``tables``: extra vote tables as for ``mer pseudolabel --source``; ``truth_uri``: true labels, when known
    (generated data), for the flip and pseudo-label precision columns."""
    truth = read_labels(truth_uri) if truth_uri else None
    results = []
    for s in seeds:
        t0 = time.time()
        loop = label_loop(with_overrides(cfg, [f"train.seed={s}"]), features_uri,
                          storage.join(out_dir, f"seed_{s}", "loop"), tables=tables)
        results.append({"seed": s, "seconds": round(time.time() - t0, 1), **_loop_figures(loop, truth)})
    return _summarise(out_dir, {"features": features_uri, "tables": tables or {}, "truth": truth_uri}, results)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else (None, None)


def _summarise(out_dir: str, store: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every stage's test WAF, the gain, flip and pseudo-label scores; written to
    ``out_dir/bench_labels.json``."""
    stage_names = list(dict.fromkeys(name for r in results for name in r["test_waf"]))
    summary: dict[str, Any] = {
        "store": store,
        "seeds": results,
        "mean_std": {name: _mean_std([r["test_waf"].get(name) for r in results]) for name in stage_names},
        "final": _mean_std([r["final_test_waf"] for r in results]),
        "gain": _mean_std([r["gain"] for r in results]),
        "gain_min": min(r["gain"] for r in results),
        "gain_best_stage": _mean_std([r["gain_best_stage"] for r in results]),
        "gain_best_stage_min": min(r["gain_best_stage"] for r in results),
        "flip_precision": _mean_std([r.get("refinement", {}).get("flip_precision") for r in results]),
        "flip_recall": _mean_std([r.get("refinement", {}).get("flip_recall") for r in results]),
        "relabel_correct": _mean_std([r.get("refinement", {}).get("relabel_correct") for r in results]),
        "pseudo_precision": _mean_std([p for r in results for p in r["pseudo_precision"].values()]),
    }
    storage.write_json(storage.join(out_dir, "bench_labels.json"), summary)
    return summary


def bench_labels(cfg: MerConfig, out_dir: str, *, seeds: list[int], n_train: int = 200, pool_ratio: float = 2.5,
                 n_test: int = 200, noise: float = 2.0, label_noise: float = 0.15) -> dict[str, Any]:
    """Run :func:`bench_seed` for every seed under ``out_dir/seed_<s>`` and summarise mean and spread."""
    if not storage.is_s3(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = [bench_seed(cfg, storage.join(out_dir, f"seed_{s}"), s, n_train=n_train, pool_ratio=pool_ratio,
                          n_test=n_test, noise=noise, label_noise=label_noise) for s in seeds]
    return _summarise(out_dir, {"n_train": n_train, "pool_ratio": pool_ratio, "n_test": n_test, "noise": noise,
                                "label_noise": label_noise, **STORE}, results)


def format_bench(summary: dict[str, Any]) -> str:
    """The seed table and the mean ± std line of ``mer bench labels``."""
    def f(x: float | None) -> str:
        return "  -  " if x is None else f"{x:.3f}"

    stages = list(summary["mean_std"])
    head = f"{'seed':>4} " + " ".join(f"{s[:13]:>13}" for s in stages) + \
        f" {'best':>13} {'gain':>7} {'flipP':>6} {'flipR':>6} {'relab✓':>6} {'PL prec':>7}"
    lines = ["Test-split WAF per label stage (* = accepted by the gate; best = what mer score uses: the best stage, "
             "or with labels.final=ensemble the accepted stages' ensemble)", head]
    for r in summary["seeds"]:
        cells = [f"{f(r['test_waf'].get(s)) + ('*' if r['accepted'].get(s) else ' '):>13}" for s in stages]
        ref = r.get("refinement", {})
        pp = [p for p in r["pseudo_precision"].values() if p is not None]
        lines.append(f"{r['seed']:>4} " + " ".join(cells) + f" {r['best'][:13]:>13} {r['gain']:+.3f} "
                     f"{f(ref.get('flip_precision')):>6} {f(ref.get('flip_recall')):>6} "
                     f"{f(ref.get('relabel_correct')):>6} {f(float(np.mean(pp)) if pp else None):>7}")
    ms = summary["mean_std"]
    lines.append("mean " + " ".join(f"{f(ms[s][0]):>13}" for s in stages) + f" {f(summary['final'][0]):>13} "
                 f"{summary['gain'][0]:+.3f} {f(summary['flip_precision'][0]):>6} {f(summary['flip_recall'][0]):>6} "
                 f"{f(summary['relabel_correct'][0]):>6} {f(summary['pseudo_precision'][0]):>7}")
    lines.append(" std " + " ".join(f"{f(ms[s][1]):>13}" for s in stages) + f" {f(summary['final'][1]):>13} "
                 f"{summary['gain'][1]:.3f}")
    lines.append(f"gain of the loop (what mer score uses − labelled only): mean {summary['gain'][0]:+.4f}, "
                 f"std {summary['gain'][1]:.4f}, worst seed {summary['gain_min']:+.4f}")
    lines.append(f"gain of the best single stage (highest gate WAF): mean {summary['gain_best_stage'][0]:+.4f}, "
                 f"std {summary['gain_best_stage'][1]:.4f}, worst seed {summary['gain_best_stage_min']:+.4f}")
    return "\n".join(lines) + "\n" + json.dumps(summary["store"])


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench labels``: on generated stores, or ``--features`` (an existing store, its test split judges)."""
    p = sub.add_parser("labels", parents=parents, help="does the label loop pay off? (test WAF per stage over seeds)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (a generated store each, or --features' folds)")
    p.add_argument("--noise", type=float, default=2.0, help="feature noise of the generated stores")
    p.add_argument("--n-train", type=int, default=200, help="labelled train clips per generated store")
    p.add_argument("--pool-ratio", type=float, default=2.5, help="unlabelled pool / train clips")
    p.add_argument("--n-test", type=int, default=200, help="labelled test clips (never seen)")
    p.add_argument("--label-noise", type=float, default=0.15, help="train labels flipped")
    p.add_argument("--features", default=None, help="loop over this feature store instead of generated ones (its "
                   "test split judges; --seeds draws other folds)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=URI",
                   help="with --features: vote table, as for mer pseudolabel (repeatable)")
    p.add_argument("--truth", default=None, help="with --features: true labels (CSV/Parquet), when known")
    p.add_argument("--out", default="runs/bench-labels", help="working directory")
    # laptop-scale training below the user's overlays and --set flags
    p.set_defaults(bench=run_command, preset=(BENCH_OVERRIDES, None))


def run_command(cfg: MerConfig, args: argparse.Namespace) -> str:
    """The bench's table."""
    seeds = list(range(args.seeds))
    if args.features:
        return format_bench(bench_store(cfg, args.features, args.out, seeds=seeds, tables=parse_sources(args.source),
                                        truth_uri=args.truth))
    return format_bench(bench_labels(cfg, args.out, seeds=seeds, noise=args.noise, n_train=args.n_train,
                                     pool_ratio=args.pool_ratio, n_test=args.n_test, label_noise=args.label_noise))
