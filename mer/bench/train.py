"""``mer bench train``: training throughput (samples/s) with 1 and 2 Ray Train workers on the same data.

Runs one fold of the configured fusion model on a generated feature store (sized like pooled real
features) for a fixed number of epochs, once per worker count, and reports the median per-epoch
throughput (epoch 1 excluded: it includes reading the shard) and the scaling ratio.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Any

import numpy as np

from mer.config import MerConfig, with_overrides
from mer.runtime.session import init_ray
from mer.store import storage
from mer.store.parts import PartStore
from mer.synth.feature_store import make_feature_store
from mer.train.features import modality_dims
from mer.train.fold import controller_poll_interval, run_folds
from mer.train.run import fold_assignment, label_rows, quiet_data

log = logging.getLogger("mer.train")


def bench_train(cfg: MerConfig, *, n: int = 4000, dim: int = 256, epochs: int = 4,
                workers: tuple[int, ...] = (1, 2), features_uri: str | None = None,
                out_uri: str | None = None) -> dict[str, Any]:
    """Measure samples/s for each worker count in ``workers``; returns the figures and prints a table.

    ``features_uri``: an existing store to use instead of a generated one (``n``, ``dim`` ignored).
    """
    cfg = init_ray(cfg)
    tmp = tempfile.mkdtemp(prefix="mer-bench-train-")
    out_uri = out_uri or tmp
    if features_uri is None:
        features_uri = storage.join(tmp, "features")
        make_feature_store(features_uri, n=n, dims={m: dim for m in ("global_visual", "face", "audio", "text")},
                           seed=0, missing=0.1, test_frac=0.0, rows_per_part=1024)
    store = PartStore(features_uri)
    mods = [m for m in cfg.train.modalities if m in store.columns]
    dims = modality_dims(store, mods)
    cv, *_ = label_rows(store, None)
    ids, y = cv.column("clip_id").to_pylist(), np.asarray(cv.column("y").to_numpy())
    fold_of = fold_assignment(y, max(cfg.train.folds, 2), cfg.train.seed)
    train_t = {c: (int(v), 1.0) for c, v, f in zip(ids, y, fold_of) if f != 0}
    val_t = {c: (int(v), 1.0) for c, v, f in zip(ids, y, fold_of) if f == 0}
    with quiet_data():
        base = store.dataset(columns=mods).materialize()

    results: dict[str, Any] = {"model": cfg.train.model, "modalities": mods, "dims": dims,
                               "n_train": len(train_t), "epochs": epochs, "zero_stage": cfg.train.zero_stage,
                               "precision": "bf16" if cfg.train.bf16 else "fp32",
                               "use_gpu": cfg.train.resources.num_gpus > 0,
                               "batch_size": cfg.train.resources.batch_size, "runs": {}}
    for w in workers:
        run_cfg = with_overrides(cfg, [f"train.resources.concurrency={w}", f"train.max_epochs={epochs}",
                                       f"train.patience={epochs}", "train.max_failures=0"])
        tc = run_cfg.train
        t0 = time.time()
        with controller_poll_interval(tc.poll_interval_s):
            res = run_folds(run_cfg, folds=[0], arch=tc.model, dims=dims, dataset=base, targets={0: (train_t, val_t)},
                            ray_dir=storage.join(out_uri, f"ray_w{w}_{int(t0)}"))[0]
        wall = time.time() - t0
        hist = res["state"]["history"]
        steady = [h["samples_per_s"] for h in hist[1:]] or [h["samples_per_s"] for h in hist]
        results["runs"][str(w)] = {"workers": w, "samples_per_s": float(np.median(steady)),
                                   "epoch_seconds": [round(h["seconds"], 3) for h in hist],
                                   "fit_seconds": round(wall, 2)}
    if len(workers) >= 2:
        a, b = results["runs"][str(workers[0])], results["runs"][str(workers[-1])]
        results["scaling"] = b["samples_per_s"] / a["samples_per_s"] if a["samples_per_s"] else None
    print(format_bench(results))
    return results


def format_bench(results: dict[str, Any]) -> str:
    """Plain-text table of :func:`bench_train`'s figures."""
    lines = [f"train bench: {results['model']} on {results['n_train']} rows, modalities {results['modalities']}, "
             f"ZeRO-{results['zero_stage']} {results['precision']}, {'GPU' if results['use_gpu'] else 'CPU'}",
             f"{'workers':>8}{'samples/s':>12}{'fit s':>9}"]
    for r in results["runs"].values():
        lines.append(f"{r['workers']:>8}{r['samples_per_s']:>12.1f}{r['fit_seconds']:>9.1f}")
    if results.get("scaling") is not None:
        lines.append(f"scaling {list(results['runs'])[-1]} vs {list(results['runs'])[0]} workers: "
                     f"{results['scaling']:.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench train``."""
    p = sub.add_parser("train", parents=parents, help="training samples/s for 1 and 2 workers (Ray Train + DeepSpeed)")
    p.set_defaults(bench=run_command)


def run_command(cfg: MerConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The figures (the table is printed as they are measured)."""
    return bench_train(cfg)
