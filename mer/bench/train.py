"""``mer bench train``: where a k-fold training run's wall time goes, against the compute it needs.

On one feature store (by default a generated one of the demo's size: 120 labelled clips, an unlabelled pool and
a test split, the demo's modalities and tiny-encoder vector sizes) and one config (the demo's training
settings: 3 folds, one worker, 20 epochs, patience 5), it measures

(a) the wall time of a k-fold run (:func:`mer.train.train_run`, run directory and all),
(b) the sum of its folds' fit time as the workers measure it (first epoch to the fold's last checkpoint),
(c) the compute floor: the same folds, each for the epochs it ran in (a), in one plain PyTorch process on the
    same vectors (reading them included), no Ray, no DeepSpeed,

and the start-up split of (a): the driver's preparation, the worker group's start, the worker's imports, the
data hand-over to the workers, the DeepSpeed engines, the run directory's finish. It prints ``run / floor`` and
``overhead = run - fits``; ``--json`` carries them as ``run_over_floor`` and ``overhead_s``. Then the same run
twice on one fit service (``service``: the first starts its worker groups, the second finds them up, as every
later run of a job does), each against the floor. ``--job`` adds the
label loop's source runs (fused + each modality) trained as one job (``--separate``: and one after another, as
before they were one job), against their floor. ``--throughput`` adds the older figure: samples/s of one fold
with 1 and 2 Ray Train workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from mer.config import BRANCHES, MerConfig, with_overrides
from mer.runtime.session import init_ray
from mer.store import storage
from mer.store.parts import PartStore, read_parts
from mer.synth.feature_store import make_feature_store
from mer.train import train_run
from mer.train.features import modality_dims, table_inputs
from mer.train.fold import controller_poll_interval, run_folds
from mer.train.run import RunRequest, cv_folds, fold_assignment, label_rows, quiet_data, train_runs
from mer.train.service import fit_service

log = logging.getLogger("mer.train")

# The demo's training settings (mer.demo.DEMO_OVERRIDES; the bench layer sits below the demo and cannot import
# it): 3 folds in turn in one worker group of one worker, 20 epochs, patience 5, the 0.1 s controller poll.
DEMO_TRAIN: list[str] = [
    "train.folds=3", "train.resources.concurrency=1", "train.parallel_folds=1", "train.max_epochs=20",
    "train.patience=5", "train.poll_interval_s=0.1",
    "train.modalities=[global_visual,face,audio,text,text_enriched,visual_description]",
    "labels.source_modalities=[global_visual,face,audio,text,visual_description]",
]
# The demo's modalities with the tiny encoders' vector sizes; 120 labelled train clips, a pool 2.5x that and
# a 300-clip test split, as `make demo` makes them.
DEMO_DIMS = {"global_visual": 64, "face": 48, "audio": 32, "text": 96, "text_enriched": 96,
             "visual_description": 96}
DEMO_ROWS = {"train": 120, "unlabeled": 300, "test": 300}


def demo_store(uri: str, seed: int = 0) -> str:
    """A generated feature store of the demo's size at ``uri`` (made once; reused when it exists)."""
    if not storage.exists(storage.join(uri, "_meta.json")):
        n = sum(DEMO_ROWS.values())
        make_feature_store(uri, n=n, dims=DEMO_DIMS, seed=seed, noise=1.0, missing=0.1,
                           test_frac=DEMO_ROWS["test"] / n, unlabeled_frac=DEMO_ROWS["unlabeled"] / n,
                           label_noise=0.15)
    return uri


def compute_floor(cfg: MerConfig, features_uri: str, mods: list[str], epochs: dict[int, int]) -> dict[str, Any]:
    """The same folds in one plain PyTorch process: each fold ``k`` trained for ``epochs[k]`` epochs (the epochs
    it ran in the measured run) with the same model, seeds, batches, optimizer (AdamW, gradient clipping 1.0)
    and a validation pass per epoch, on the store's vectors read here. Returns seconds: ``load_s`` (reading the
    vectors), ``folds_s`` (per fold) and ``total_s`` (both)."""
    import torch  # lazy: the bench's light paths need no torch
    import torch.nn.functional as F

    from mer.fusion import build_model

    tc = cfg.train
    torch.set_num_threads(max(1, int(tc.resources.num_cpus)))
    t0 = time.time()
    store = PartStore.of(features_uri)
    dims = modality_dims(store, mods)
    cv, _, _, store_train = label_rows(store, None)
    ids = cv.column("clip_id").to_pylist()
    y_all = np.asarray(cv.column("y").to_numpy(), np.int64)
    fold_of = cv_folds(store_train, ids, tc.folds, tc.seed)
    table = read_parts(store, columns=mods)
    row = {c: i for i, c in enumerate(table.column("clip_id").to_pylist())}
    x_store, m_store = table_inputs(table, mods, dims)
    sel = np.array([row[c] for c in ids], dtype=np.int64)
    x_all, m_all = x_store[sel], m_store[sel]
    means, stds, start = [], [], 0
    for j, m in enumerate(mods):
        v = x_all[m_all[:, j], start:start + dims[m]].astype(np.float64)
        start += dims[m]
        means.append(v.mean(axis=0) if len(v) else np.zeros(dims[m]))
        stds.append(v.std(axis=0) if len(v) else np.ones(dims[m]))
    stats = (np.concatenate(means).tolist(), np.concatenate(stds).tolist())
    load_s = time.time() - t0

    folds_s: dict[int, float] = {}
    for k, n_epochs in sorted(epochs.items()):
        t1 = time.time()
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        torch.manual_seed(tc.seed * 1000 + k)
        model = build_model(tc.model, dims, tc)
        if tc.standardize_inputs:
            model.set_input_stats(*stats)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                weight_decay=tc.weight_decay)
        xt, mt = torch.from_numpy(x_all[tr]), torch.from_numpy(m_all[tr])
        yt = torch.from_numpy(y_all[tr])
        xv, mv = torch.from_numpy(x_all[va]), torch.from_numpy(m_all[va])
        for epoch in range(1, n_epochs + 1):
            model.train()
            order = np.random.default_rng(tc.seed * 1000 + k * 100 + epoch).permutation(len(tr))
            for s in range(0, len(order), tc.resources.batch_size):
                b = torch.from_numpy(order[s:s + tc.resources.batch_size])
                logits, _ = model(xt[b], mt[b])
                loss = F.cross_entropy(logits, yt[b], label_smoothing=tc.label_smoothing)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            model.eval()
            with torch.no_grad():
                model(xv, mv)
        folds_s[k] = time.time() - t1
    return {"load_s": load_s, "folds_s": folds_s, "total_s": load_s + sum(folds_s.values())}


def bench_run(cfg: MerConfig, features_uri: str, out_uri: str) -> dict[str, Any]:
    """(a), (b), (c) and the start-up split for one k-fold run of ``cfg`` on ``features_uri``."""
    store = PartStore.of(features_uri)
    mods = [m for m in cfg.train.modalities if m in store.columns]
    run_cfg = with_overrides(cfg, [f"train.modalities=[{','.join(mods)}]"])
    load = os.getloadavg()
    t0 = time.time()
    metrics = train_run(run_cfg, store, out_uri)
    wall = time.time() - t0
    folds = metrics["folds"]
    fits = sum(float(f["seconds"]) for f in folds)
    floor = compute_floor(run_cfg, features_uri, mods, {int(f["fold"]): int(f["epochs"]) for f in folds})
    timing = metrics.get("timing", {})
    groups = timing.get("groups", [])
    fold_metrics = storage.read_table(storage.join(out_uri, "fold_metrics.parquet")).to_pylist()
    split = {
        "prepare_s": timing.get("prepare_s"),
        "worker_group_s": sum(g["group_start_s"] for g in groups),
        "imports_s": sum(g["imports_s"] for g in groups),
        "data_to_workers_s": sum(g["data_s"] for g in groups),
        "engine_s": sum(float(r.get("engine_s") or 0.0) for r in fold_metrics),
        "finish_s": (timing.get("finish_s") or 0.0) + (timing.get("report_s") or 0.0),
    }
    return {"model": run_cfg.train.model, "modalities": mods, "folds": len(folds),
            "n_cv": metrics["n_cv"], "epochs": [int(f["epochs"]) for f in folds],
            "workers": run_cfg.train.resources.concurrency, "zero_stage": run_cfg.train.zero_stage,
            "rows": timing.get("rows"),
            "run_s": round(wall, 2), "fits_s": round(fits, 2), "floor_s": round(floor["total_s"], 2),
            "floor": {"load_s": round(floor["load_s"], 2),
                      "folds_s": [round(v, 2) for _, v in sorted(floor["folds_s"].items())]},
            "run_over_floor": wall / floor["total_s"] if floor["total_s"] else None,
            "overhead_s": round(wall - fits, 2), "startup": {k: round(v, 2) if v is not None else None
                                                             for k, v in split.items()},
            "cv_waf_mean": metrics["cv_waf_mean"], "loadavg_before": [round(x, 2) for x in load],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def bench_service(cfg: MerConfig, features_uri: str, out_uri: str, floor_s: float, runs: int = 2) -> dict[str, Any]:
    """The run of :func:`bench_run` trained ``runs`` times on one fit service (:mod:`mer.train.service`): the first
    run starts the service's worker groups, every later one finds them up, as every run after the first of a label
    loop, an ablation or a study does. Per run: wall, fits, ``over_floor`` (against :func:`bench_run`'s floor)."""
    store = PartStore.of(features_uri)
    mods = [m for m in cfg.train.modalities if m in store.columns]
    run_cfg = with_overrides(cfg, [f"train.modalities=[{','.join(mods)}]"])
    out: list[dict[str, Any]] = []
    with fit_service(run_cfg, storage.join(out_uri, "ray"), groups=run_cfg.train.parallel_folds):
        for i in range(runs):
            load = os.getloadavg()
            t0 = time.time()
            metrics = train_run(run_cfg, store, storage.join(out_uri, f"run{i}"))
            wall = time.time() - t0
            fits = sum(float(f["seconds"]) for f in metrics["folds"])
            out.append({"run_s": round(wall, 2), "fits_s": round(fits, 2),
                        "over_floor": wall / floor_s if floor_s else None,
                        "worker_group_s": round(sum(g["group_start_s"] for g in metrics["timing"]["groups"]), 2),
                        "cv_waf_mean": metrics["cv_waf_mean"], "loadavg_before": [round(x, 2) for x in load]})
    return {"runs": out, "target_s": 2 * floor_s + 10}


def source_runs(cfg: MerConfig, store: PartStore) -> dict[str, list[str]]:
    """The label loop's stage-0 runs on ``store``: ``fused`` (every configured modality the store has) and one
    run per modality of ``labels.source_modalities`` (null: every fused modality)."""
    mods = [m for m in cfg.train.modalities if m in store.columns]
    wanted = cfg.labels.source_modalities
    singles = list(mods) if wanted is None else [m for m in wanted if m in mods]
    return {"fused": mods, **{m: [m] for m in singles}}


def bench_job(cfg: MerConfig, features_uri: str, out_uri: str, *, separate: bool = False) -> dict[str, Any]:
    """The label loop's stage-0 runs (:func:`source_runs`) as ONE training job (:func:`mer.train.run.train_runs`):
    its wall, the sum of its fits, and the floor (each run's folds for the epochs they ran, one plain PyTorch
    process, the vectors read once); with ``separate`` also the same runs one :func:`train_run` after another
    (what the label loop did before its sources were one job)."""
    store = PartStore.of(features_uri)
    runs = source_runs(cfg, store)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: dict[str, Any] = {"runs": {n: m for n, m in runs.items()}}
    modes = [("job", False), *([("separate", True)] if separate else [])]
    for mode, alone in modes:
        base = storage.join(out_uri, f"{mode}-{stamp}")
        load = os.getloadavg()
        t0 = time.time()
        if alone:
            metrics = [train_run(cfg, store, storage.join(base, n), modalities=m, run_name=n) for n, m in runs.items()]
        else:
            metrics = train_runs(cfg, store, [RunRequest(storage.join(base, n), None, m, n) for n, m in runs.items()],
                                 job_dir=storage.join(base, "ray"))
        wall = time.time() - t0
        out[mode] = {"wall_s": round(wall, 2),
                     "fits_s": round(sum(float(f["seconds"]) for mt in metrics for f in mt["folds"]), 2),
                     "cv_waf_mean": {n: round(mt["cv_waf_mean"], 4) for n, mt in zip(runs, metrics)},
                     "loadavg_before": [round(x, 2) for x in load],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        out[mode]["overhead_s"] = round(wall - out[mode]["fits_s"], 2)
        if "floor_s" not in out:
            floors = [compute_floor(cfg, features_uri, m, {int(f["fold"]): int(f["epochs"]) for f in mt["folds"]})
                      for m, mt in zip(runs.values(), metrics)]
            # The vectors are read once for the whole job's floor.
            out["floor_s"] = round(max(f["load_s"] for f in floors) + sum(sum(f["folds_s"].values()) for f in floors), 2)
        out[mode]["over_floor"] = wall / out["floor_s"] if out["floor_s"] else None
    return out


def bench_throughput(cfg: MerConfig, *, n: int = 4000, dim: int = 256, epochs: int = 4,
                     workers: tuple[int, ...] = (1, 2), out_uri: str | None = None) -> dict[str, Any]:
    """Samples/s of one fold for each worker count in ``workers`` on a generated store of ``n`` rows of
    ``dim``-sized vectors (median per-epoch throughput, epoch 1 excluded: it includes reading the shard)."""
    out_uri = out_uri or tempfile.mkdtemp(prefix="mer-bench-train-")
    features_uri = storage.join(out_uri, "features-throughput")
    make_feature_store(features_uri, n=n, dims={m: dim for m in BRANCHES}, seed=0, missing=0.1, test_frac=0.0,
                       rows_per_part=1024)
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
    out: dict[str, Any] = {"n_train": len(train_t), "epochs": epochs, "runs": {}}
    for w in workers:
        run_cfg = with_overrides(cfg, [f"train.resources.concurrency={w}", f"train.max_epochs={epochs}",
                                       f"train.patience={epochs}", "train.max_failures=0"])
        tc = run_cfg.train
        t0 = time.time()
        with controller_poll_interval(tc.poll_interval_s):
            res = run_folds(run_cfg, folds=[0], arch=tc.model, dims=dims, dataset=base, targets={0: (train_t, val_t)},
                            ray_dir=storage.join(out_uri, f"ray_w{w}_{int(t0)}"))[0]
        hist = res["state"]["history"]
        steady = [h["samples_per_s"] for h in hist[1:]] or [h["samples_per_s"] for h in hist]
        out["runs"][str(w)] = {"workers": w, "samples_per_s": float(np.median(steady)),
                               "fit_seconds": round(time.time() - t0, 2)}
    if len(workers) >= 2:
        a, b = out["runs"][str(workers[0])], out["runs"][str(workers[-1])]
        out["scaling"] = b["samples_per_s"] / a["samples_per_s"] if a["samples_per_s"] else None
    return out


def bench_train(cfg: MerConfig, *, features_uri: str | None = None, out_uri: str | None = None,
                throughput: bool = False, job: bool = False, separate: bool = False) -> dict[str, Any]:
    """:func:`bench_run` on ``features_uri`` (default: :func:`demo_store`) with ``cfg`` (``mer bench train``
    starts from :data:`DEMO_TRAIN`, the user's ``--set`` flags win), plus :func:`bench_throughput` when
    ``throughput`` and :func:`bench_job` when ``job`` (``separate``: also the runs one after another); prints the
    table."""
    cfg = init_ray(cfg)
    out_uri = out_uri or tempfile.mkdtemp(prefix="mer-bench-train-")
    if features_uri is None:
        features_uri = demo_store(storage.join(out_uri, "features-demo"))
    stamp = time.strftime('%Y%m%d-%H%M%S')
    result = bench_run(cfg, features_uri, storage.join(out_uri, f"run-{stamp}"))
    result["features"] = features_uri
    result["service"] = bench_service(cfg, features_uri, storage.join(out_uri, f"service-{stamp}"), result["floor_s"])
    if job:
        result["job"] = bench_job(cfg, features_uri, out_uri, separate=separate)
    if throughput:
        result["throughput"] = bench_throughput(cfg, out_uri=out_uri)
    print(format_bench(result))
    return result


def format_bench(r: dict[str, Any]) -> str:
    """Plain-text table of :func:`bench_train`'s figures."""
    s = r["startup"]
    lines = [f"train bench: {r['model']} on {r['n_cv']} labelled rows, {r['folds']} folds (epochs {r['epochs']}), "
             f"{r['workers']} worker(s), ZeRO-{r['zero_stage']}, modalities {r['modalities']}, rows read "
             f"{'on the driver' if r.get('rows') == 'driver' else 'by Ray Data'}",
             f"{'run (wall)':>28}{r['run_s']:>9.1f} s",
             f"{'fits (workers)':>28}{r['fits_s']:>9.1f} s",
             f"{'floor (plain PyTorch)':>28}{r['floor_s']:>9.1f} s   (load {r['floor']['load_s']:.1f} s, folds "
             f"{', '.join(f'{v:.1f}' for v in r['floor']['folds_s'])} s)",
             f"{'run / floor':>28}{r['run_over_floor']:>9.2f} x",
             f"{'overhead = run - fits':>28}{r['overhead_s']:>9.1f} s",
             "start-up split:"]
    for key, label in (("prepare_s", "driver preparation"), ("worker_group_s", "worker group start"),
                       ("imports_s", "worker imports"), ("data_to_workers_s", "data to the workers"),
                       ("engine_s", "DeepSpeed engines"), ("finish_s", "run directory, report")):
        v = s.get(key)
        lines.append(f"{label:>28}{v if v is not None else float('nan'):>9.1f} s")
    lines.append(f"load average {r['loadavg_before']} before, {r['loadavg_after']} after")
    sv = r.get("service")
    if sv:
        lines.append(f"the same run on a fit service (worker groups that stay up for a job; target 2 x floor + 10 s "
                     f"= {sv['target_s']:.1f} s):")
        for i, x in enumerate(sv["runs"]):
            what = "first run (groups start)" if i == 0 else f"run {i + 1} (groups up)"
            verdict = "met" if x["run_s"] <= sv["target_s"] else "not met"
            lines.append(f"{what:>28}{x['run_s']:>9.1f} s   fits {x['fits_s']:.1f} s, {x['over_floor']:.2f}x floor, "
                         f"worker group start {x['worker_group_s']:.1f} s, CV WAF {x['cv_waf_mean']:.4f}: {verdict}")
    j = r.get("job")
    if j:
        lines.append(f"label-loop sources {list(j['runs'])}: floor {j['floor_s']:.1f} s")
        for mode in ("job", "separate"):
            if mode in j:
                x = j[mode]
                lines.append(f"{('one job' if mode == 'job' else 'one run after another'):>28}{x['wall_s']:>9.1f} s"
                             f"   fits {x['fits_s']:.1f} s, overhead {x['overhead_s']:.1f} s, "
                             f"{x['over_floor']:.2f}x floor, load {x['loadavg_before']}")
        if "separate" in j and j["job"]["wall_s"]:
            lines.append(f"{'separate / job':>28}{j['separate']['wall_s'] / j['job']['wall_s']:>9.2f} x")
    t = r.get("throughput")
    if t:
        lines.append(f"throughput on {t['n_train']} rows: " + ", ".join(
            f"{x['workers']} worker(s) {x['samples_per_s']:.0f} samples/s" for x in t["runs"].values())
            + (f", scaling {t['scaling']:.2f}x" if t.get("scaling") else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench train [--features STORE] [--out DIR] [--throughput] [--job [--separate]]`` (the demo's
    training settings and tiny profile as its preset)."""
    p = sub.add_parser("train", parents=parents,
                       help="a k-fold run's wall time vs its fits and the plain-PyTorch floor; start-up split")
    p.add_argument("--features", default=None, help="feature store (default: a generated one of the demo's size)")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--throughput", action="store_true", help="also samples/s of one fold with 1 and 2 workers")
    p.add_argument("--job", action="store_true",
                   help="also the label loop's source runs (fused + each modality) as one training job")
    p.add_argument("--separate", action="store_true", help="with --job: also those runs one after another")
    p.set_defaults(bench=run_command, preset=(DEMO_TRAIN, "tiny"))


def run_command(cfg: MerConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The figures (the table is printed as they are measured)."""
    return bench_train(cfg, features_uri=args.features, out_uri=args.out, throughput=args.throughput,
                       job=args.job, separate=args.separate)
