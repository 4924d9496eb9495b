"""``train_run``: k-fold cross-validation of a fusion model with Ray Train + DeepSpeed, and its run directory.

Layout of ``out_uri`` (docs/architecture.md "Training run directory"): ``config.yaml``, ``metrics.json``,
``fold_metrics.parquet``, ``history.parquet``, ``oof.parquet``, ``test_predictions.parquet``,
``models/fold_<k>.pt`` + ``models/model.json``, ``confusion_matrix.png``, ``curves.png``,
``modality_weights.json``, ``ray/`` (Ray Train checkpoints), and ``folds/`` (per-fold commit records:
a fold whose ``folds/fold_<k>.json`` exists is finished and skipped by ``resume=True``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS, MerConfig, TrainConfig, dump_config, with_overrides
from mer.evaluation.metrics import accuracy, confusion, per_class_f1, plot_confusion, weighted_f1
from mer.evaluation.report import write_run_report
from mer.runs.layout import model_file
from mer.runs.provenance import store_record
from mer.runtime.placement import ensure_placeable, train_demands
from mer.runtime.session import init_ray
from mer.store import storage
from mer.store.data_context import data_context
from mer.store.parts import PartStore, iter_parts, read_dataset, read_parts
from mer.train.ensemble import load_ensemble
from mer.train.features import LABEL_INDEX, input_stats, label_index, modality_dims
from mer.train.fold import controller_poll_interval, run_folds
from mer.train.results import plot_curves, prediction_table, weight_summary

log = logging.getLogger("mer.train")


# --------------------------------------------------------------------------------------------- labels
# A schema, not empty arrays: pa.array() at import time would import pandas on every `mer` command.
_ROWS_SCHEMA = pa.schema([("clip_id", pa.string()), ("y", pa.int64()), ("w", pa.float32()), ("fold", pa.int32())])


def label_rows(features_uri: str | PartStore, labels_uri: str | None
               ) -> tuple[pa.Table, pa.Table, dict[str, str], pa.Table]:
    """(cross-validation rows, pseudo rows, clip → split, the store's labelled train rows).

    CV rows: clip_id, y, w; pseudo rows add ``fold`` (null: trains in every fold, k: only in fold k's
    training part — pseudo-labels chosen by fold k's models, so fold k's validation rows never reach its
    training set through them). Without a label table the CV rows are the store's labelled ``train`` split.
    With one, its labels and weights override; ``source=pseudo`` rows only ever train. Test-split clips never
    train. The store's train rows (clip_id, y) fix the fold assignment whatever the label table says.
    """
    store = read_parts(features_uri, columns=["split", "label"])
    ids_all = store.column("clip_id").to_pylist()
    split_of = dict(zip(ids_all, store.column("split").to_pylist()))
    y_store = label_index(store.column("label").to_pylist())
    is_train = np.array([split_of[c] == "train" for c in ids_all], dtype=bool) & (y_store >= 0)
    store_train = pa.table({"clip_id": pa.array([c for c, k in zip(ids_all, is_train) if k], pa.string()),
                            "y": pa.array(y_store[is_train], pa.int64())})
    if labels_uri is None:
        cv = store_train.append_column("w", pa.array(np.ones(store_train.num_rows, np.float32)))
        return cv, _ROWS_SCHEMA.empty_table(), split_of, store_train
    lt = storage.read_table(labels_uri)
    if "clip_id" not in lt.column_names or "label" not in lt.column_names:
        raise ValueError(f"label table {labels_uri}: needs clip_id and label columns")
    n = lt.num_rows
    ids = lt.column("clip_id").to_pylist()
    y = label_index(lt.column("label").to_pylist())
    w = (np.asarray(lt.column("weight").fill_null(1.0).to_numpy(zero_copy_only=False), np.float32)
         if "weight" in lt.column_names else np.ones(n, np.float32))
    src = lt.column("source").to_pylist() if "source" in lt.column_names else ["original"] * n
    fold = (lt.column("fold").cast(pa.int32()).to_pylist() if "fold" in lt.column_names else [None] * n)
    usable = np.array([yy >= 0 and ww > 0 and split_of.get(c) not in (None, "test")
                       for c, yy, ww in zip(ids, y, w)], dtype=bool)
    dropped = int(n - usable.sum())
    if dropped:
        log.warning("label table %s: %d rows unusable (unknown label, weight 0, clip not in the store or "
                    "in the test split)", labels_uri, dropped)
    pseudo = np.array([s == "pseudo" for s in src], dtype=bool)

    def pick(sel: np.ndarray, with_fold: bool) -> pa.Table:
        cols = {"clip_id": pa.array([c for c, k in zip(ids, sel) if k], pa.string()),
                "y": pa.array(y[sel], pa.int64()), "w": pa.array(w[sel], pa.float32())}
        if with_fold:
            cols["fold"] = pa.array([f for f, k in zip(fold, sel) if k], pa.int32())
        return pa.table(cols)

    return pick(usable & ~pseudo, False), pick(usable & pseudo, True), split_of, store_train


def fold_assignment(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified, seeded fold index per row."""
    from sklearn.model_selection import StratifiedKFold

    if len(y) < folds:
        raise ValueError(f"{len(y)} labelled rows cannot make {folds} folds")
    counts = np.bincount(y, minlength=len(LABELS))
    # StratifiedKFold needs every class to have >= folds members to stratify it; rarer ones are spread.
    strat = np.where(counts[y] >= folds, y, -1)
    out = np.zeros(len(y), dtype=np.int64)
    for k, (_, val_idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, strat)):
        out[val_idx] = k
    return out


def cv_folds(store_train: pa.Table, cv_ids: list[str], folds: int, seed: int) -> np.ndarray:
    """Fold of each CV row. Folds are drawn over the store's labelled train rows, stratified by their
    original labels, so every run on the same store (any label table, any modalities) validates on the same
    rows: refined or pseudo-labelled runs stay comparable out of fold. The draw is over the rows in clip-id
    order: a store's row order is the order its parts were committed in, which depends on how fast each actor
    ran, and two extractions of the same clips must give the same folds. CV rows the store does not label
    (a label table may add some) get a fold from a hash of their id."""
    import hashlib

    store_train = store_train.sort_by("clip_id")
    assigned = dict(zip(store_train.column("clip_id").to_pylist(),
                        fold_assignment(np.asarray(store_train.column("y").to_numpy()), folds, seed).tolist())
                    ) if store_train.num_rows >= folds else {}
    out = np.empty(len(cv_ids), dtype=np.int64)
    for i, c in enumerate(cv_ids):
        k = assigned.get(c)
        out[i] = k if k is not None else int(hashlib.sha1(f"{seed}:{c}".encode()).hexdigest(), 16) % folds
    if len(cv_ids) < folds or len(set(out.tolist())) < folds:
        raise ValueError(f"{len(cv_ids)} labelled rows cannot make {folds} folds")
    return out


# ------------------------------------------------------------------------------------------ Ray Data
@contextlib.contextmanager
def quiet_data() -> Iterator[None]:
    """Datasets created inside don't draw progress bars (per-epoch iterations would flood the logs)."""
    with data_context(enable_progress_bars=False, print_on_execution_start=False):
        yield


def score_split(features_uri: str | PartStore, run_uri: str, modalities: list[str], split: str
                ) -> pa.Table | None:
    """Fold-ensemble predictions (mean over folds) for one split of the store, part by part on the driver.

    Evaluation only touches the held-out split's rows of one part at a time, so memory stays bounded;
    starting a Ray Data actor pool for it would cost more than the scoring itself.
    """

    ens = load_ensemble(run_uri)
    out = []
    for t in iter_parts(features_uri, columns=["split", "label", *modalities]):
        t = t.filter(pa.array([s == split for s in t.column("split").to_pylist()], pa.bool_()))
        if not t.num_rows:
            continue
        probs, weights = ens.predict(t)
        mean_p, mean_w = probs.mean(axis=1), weights.mean(axis=1)
        cols_out: dict[str, Any] = {"clip_id": t.column("clip_id"), "label": t.column("label")}
        for k, c in enumerate(PROB_COLUMNS):
            cols_out[c] = pa.array(mean_p[:, k], pa.float32())
        for j, m in enumerate(ens.modalities):
            cols_out[f"weight_{m}"] = pa.array(mean_w[:, j], pa.float32())
        out.append(pa.table(cols_out))
    return pa.concat_tables(out).sort_by("clip_id") if out else None


# ------------------------------------------------------------------------------------------- helpers
def _table_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def resolve_modalities(cfg: MerConfig, features_uri: str | PartStore, modalities: list[str] | None) -> list[str]:
    """The modalities a run fuses: ``modalities`` (each must be in the store), else those of ``train.modalities``
    the store has; validated as the config is."""

    mods = list(modalities or cfg.train.modalities)
    TrainConfig.model_validate({**cfg.train.model_dump(), "modalities": mods})  # same checks as the config
    store = PartStore.of(features_uri)
    cols = set(store.columns)
    if modalities is None:
        # The config lists every branch; a store built with some branches disabled simply lacks them.
        mods = [m for m in mods if m in cols]
    missing = [m for m in mods if m not in cols]
    if missing or not mods:
        raise ValueError(f"modalities {missing or mods} not in feature store {store.uri}")
    return mods


# ----------------------------------------------------------------------------------------- train_run
def train_run(cfg: MerConfig, features_uri: str | PartStore, out_uri: str, *, resume: bool = False,
              labels_uri: str | None = None, modalities: list[str] | None = None,
              run_name: str | None = None, callbacks: list[Any] | None = None) -> dict:
    """k-fold training of ``cfg.train.model`` on a feature store (its URI, or the store opened once by the caller:
    every read of it here shares one listing); writes the run directory, returns metrics.

    ``resume=True`` returns a finished run's metrics as they are, skips finished folds and continues the
    unfinished one from its latest Ray Train checkpoint; ``resume=False`` starts over (clears checkpoints).
    ``labels_uri``: label table (clip_id, label, weight, source) overriding labels and sample weights.
    ``modalities`` restricts the branches (ablations). ``callbacks``: Ray Train ``UserCallback``s given to
    every group's controller (progress reporting, experiment tracking; tests inject worker failures with one),
    see :func:`mer.train.fold.run_folds`. Folds train in ``train.parallel_folds`` groups at once, each group's
    folds in turn in one worker group. Needs a Ray connection (started locally if none).
    """
    from mer.fusion import build_model  # lazy: mer.fusion imports torch (a light path never needs it)

    t_start = time.time()
    metrics_uri = storage.join(out_uri, "metrics.json")
    if resume and storage.exists(metrics_uri):
        log.info("run %s already finished; resume returns its metrics", out_uri)
        return storage.read_json(metrics_uri)
    cfg = init_ray(cfg)
    ensure_placeable(f"training {out_uri}", train_demands(cfg, one_fold=True))
    if not resume:
        # Starting over: stale checkpoints would otherwise be picked up by Ray Train (same run names).
        for sub in ("ray", "folds", "models"):
            storage.delete_dir(storage.join(out_uri, sub))
        if storage.exists(metrics_uri):
            fs, path = storage.filesystem(metrics_uri)
            fs.delete_file(path)

    store = PartStore.of(features_uri)
    mods = resolve_modalities(cfg, store, modalities)
    cfg = with_overrides(cfg, [f"train.modalities=[{','.join(mods)}]"])
    tc = cfg.train
    dims = modality_dims(store, mods)
    # What the model's inputs are: scoring checks (or reproduces) the extraction it was trained on.
    spec = {**build_model(tc.model, dims, tc).spec(), "features": store_record(store)}
    storage.write_text(storage.join(out_uri, "config.yaml"), dump_config(cfg))
    storage.write_json(model_file(out_uri), spec)

    cv, pseudo, split_of, store_train = label_rows(store, labels_uri)
    cv_ids = cv.column("clip_id").to_pylist()
    cv_y = np.asarray(cv.column("y").to_numpy(), np.int64)
    cv_w = np.asarray(cv.column("w").to_numpy(), np.float32)
    fold_of = cv_folds(store_train, cv_ids, tc.folds, tc.seed)
    pseudo_fold = pseudo.column("fold").to_pylist()
    bad_folds = sorted({f for f in pseudo_fold if f is not None and not 0 <= f < tc.folds})
    if bad_folds:
        raise ValueError(f"label table {labels_uri}: pseudo rows for folds {bad_folds}, but train.folds="
                         f"{tc.folds} (per-fold pseudo-labels need the folds they were chosen for)")
    # Per fold: (label, weight) of the pseudo rows that train it (fold null: every fold).
    pseudo_by_fold: list[dict[str, tuple[int, float]]] = [{} for _ in range(tc.folds)]
    for c, y, w, f in zip(pseudo.column("clip_id").to_pylist(), pseudo.column("y").to_pylist(),
                          pseudo.column("w").to_pylist(), pseudo_fold):
        for k in (range(tc.folds) if f is None else (f,)):
            pseudo_by_fold[k][c] = (int(y), float(w))
    pseudo_ids = {c for d in pseudo_by_fold for c in d}
    log.info("train_run %s: %d CV rows, %d pseudo-labelled clips, %d folds, modalities %s", out_uri,
             len(cv_ids), len(pseudo_ids), tc.folds, mods)

    # Ray Data, not the driver, holds the vectors; materialised once so that the training workers (which
    # may hold every CPU of a small cluster) never wait for read tasks.
    with quiet_data():
        base = read_dataset(store, columns=mods).materialize()
    stats = None
    if tc.standardize_inputs:
        t0 = time.time()
        with quiet_data():
            stats = input_stats(base, mods, dims, set(cv_ids) | pseudo_ids)
        log.debug("input statistics over %d training rows in %.1f s", len(cv_ids) + len(pseudo_ids),
                 time.time() - t0)
    fold_records: dict[int, dict] = {}
    skipped: list[int] = []
    todo: list[int] = []
    for k in range(tc.folds):
        record_uri = storage.join(out_uri, "folds", f"fold_{k}.json")
        if resume and storage.exists(record_uri):
            fold_records[k] = storage.read_json(record_uri)
            skipped.append(k)
        else:
            todo.append(k)

    def fold_targets(k: int) -> tuple[dict, dict]:
        tr = fold_of != k
        train_targets = {c: (int(y), float(w)) for c, y, w, t in zip(cv_ids, cv_y, cv_w, tr) if t}
        val_targets = {c: (int(y), 1.0) for c, y, t in zip(cv_ids, cv_y, tr) if not t}
        # A labelled clip keeps its own label; a validation clip never trains, not even as a pseudo-label.
        train_targets.update({c: t for c, t in pseudo_by_fold[k].items()
                              if c not in train_targets and c not in val_targets})
        return train_targets, val_targets

    def fit_group(group: list[int]) -> dict[int, dict]:
        data = {k: fold_targets(k) for k in group}
        results = run_folds(cfg, folds=group, arch=tc.model, dims=dims, dataset=base, targets=data,
                            ray_dir=storage.join(out_uri, "ray"), input_stats=stats, callbacks=callbacks)
        records = {}
        for k in group:
            res, (train_targets, val_targets) = results[k], data[k]
            storage.write_bytes(storage.join(out_uri, "models", f"fold_{k}.pt"), res["best"])
            vp = res["val_pred"].sort_by("clip_id")
            storage.write_bytes(storage.join(out_uri, "folds", f"oof_{k}.parquet"), _table_bytes(vp))
            st = res["state"]
            record = {"fold": k, "best_epoch": st["best_epoch"], "val_waf": st["best_waf"],
                      "val_acc": next((r["val_acc"] for r in st["history"] if r["epoch"] == st["best_epoch"]),
                                      None),
                      "epochs": st["epoch"], "n_train": len(train_targets), "n_val": len(val_targets),
                      "n_pseudo": len(pseudo_by_fold[k]), "resumed_from": st["resumed_from"],
                      "seconds": round(st["finished_at"] - st["started_at"], 2), "started_at": st["started_at"],
                      "engine_s": round(float(st.get("engine_s", 0.0)), 3),
                      "finished_at": st["finished_at"], "history": st["history"],
                      "checkpoint": str(res["checkpoint_path"]), "config_hash": cfg.hash()}
            storage.write_json(storage.join(out_uri, "folds", f"fold_{k}.json"), record)  # the fold's commit record
            records[k] = record
        group_timing.append({"folds": group, **results[group[0]]["group_timing"]})
        return records

    # parallel_folds groups of folds (fold k in group k mod groups), each one TorchTrainer training its folds in
    # turn: a worker group's start-up is paid once per group, not once per fold. TorchTrainer.fit is safe to call
    # from driver threads (it only installs its SIGINT handler on the main thread), and Ray schedules the
    # worker groups as resources allow. A failed group fails the run after the others finish, so their commit
    # records survive for resume=True (and the failed group's checkpoint keeps the folds it finished).
    group_timing: list[dict[str, Any]] = []
    t_train = time.time()
    n_groups = min(tc.parallel_folds, tc.folds)
    groups = [g for g in ([k for k in todo if k % n_groups == i] for i in range(n_groups)) if g]
    with controller_poll_interval(tc.poll_interval_s):
        if len(groups) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="mer-folds") as pool:
                futures = [(g, pool.submit(fit_group, g)) for g in groups]
            errors = [(g, f.exception()) for g, f in futures if f.exception() is not None]
            if errors:
                (first, *_), err = errors[0]  # groups are in order of their first fold
                failed = sorted(k for g, _ in errors for k in g)
                raise RuntimeError(f"folds {failed} failed (first: fold {first}: {err})") from err
            for _, f in futures:
                fold_records.update(f.result())
        else:
            for g in groups:
                fold_records.update(fit_group(g))
    records = [fold_records[k] for k in sorted(fold_records)]

    t_fin = time.time()
    metrics = _finish_run(cfg, store, out_uri, records, mods, split_of)
    # Where the run's wall time went (mer bench train reads it): the driver's preparation (Ray, the store's
    # rows, input statistics), the worker groups, and the run directory's tables, plots and test scoring.
    timing = {"prepare_s": round(t_train - t_start, 3), "train_s": round(t_fin - t_train, 3),
              "groups": group_timing}
    metrics.update({"skipped_folds": skipped, "seconds": round(time.time() - t_start, 2),
                    "run_name": run_name or out_uri.rstrip("/").rsplit("/", 1)[-1], "labels": labels_uri,
                    "n_cv": len(cv_ids), "n_pseudo": len(pseudo_ids), "features": store.uri,
                    "features_config_hash": spec["features"]["config_hash"]})
    timing["finish_s"] = round(time.time() - t_fin, 3)
    metrics["timing"] = timing
    storage.write_json(metrics_uri, metrics)
    _write_report(out_uri)
    metrics["timing"]["report_s"] = round(time.time() - t_fin - timing["finish_s"], 3)
    log.debug("train_run %s: reports in %.1f s", out_uri, time.time() - t_fin)
    log.info("train_run %s: fold val WAF %s, CV mean %.4f; %.0f s", out_uri,
             " ".join(f"{r['val_waf']:.3f}" for r in records), metrics["cv_waf_mean"], metrics["seconds"])
    return metrics


def _write_report(run_uri: str) -> None:
    """``RUN/report.html``; a report that cannot be drawn never fails a finished run."""
    try:
        write_run_report(run_uri)
    except Exception as e:  # noqa: BLE001 - the run's outputs are committed; the report is a view of them
        log.warning("run %s: report.html not written: %s: %s", run_uri, type(e).__name__, e)


def _finish_run(cfg: MerConfig, features_uri: str | PartStore, out_uri: str, records: list[dict],
                mods: list[str], split_of: dict[str, str]) -> dict:
    """Assemble OOF predictions, test-split ensemble evaluation, tables and plots."""
    tc = cfg.train
    oof_parts = []
    for r in records:
        t = storage.read_table(storage.join(out_uri, "folds", f"oof_{r['fold']}.parquet"))
        oof_parts.append(t.append_column("fold", pa.array([r["fold"]] * t.num_rows, pa.int32())))
    oof_raw = pa.concat_tables(oof_parts).sort_by("clip_id")
    y_oof = np.asarray(oof_raw.column("y").to_numpy(), np.int64)
    p_oof = np.stack([oof_raw.column(c).to_numpy() for c in PROB_COLUMNS], axis=1).astype(np.float32)
    w_oof = np.stack([oof_raw.column(f"weight_{m}").to_numpy() for m in mods], axis=1).astype(np.float32)
    oof = prediction_table(oof_raw.column("clip_id").to_pylist(), [LABELS[i] for i in y_oof], p_oof, w_oof,
                           mods, extra={"fold": oof_raw.column("fold")})
    storage.write_table(storage.join(out_uri, "oof.parquet"), oof)
    pred_oof = p_oof.argmax(axis=1)

    history = [dict(h) for r in records for h in r["history"]]
    storage.write_table(storage.join(out_uri, "history.parquet"), pa.Table.from_pylist(history))
    fold_rows = [{k: v for k, v in r.items() if k not in ("history",)} for r in records]
    for row in fold_rows:
        row["resumed_from"] = ",".join(str(e) for e in row["resumed_from"])
    storage.write_table(storage.join(out_uri, "fold_metrics.parquet"), pa.Table.from_pylist(fold_rows))
    plot_curves(history, storage.join(out_uri, "curves.png"))

    metrics: dict[str, Any] = {
        "model": tc.model, "modalities": mods, "folds": [{k: r[k] for k in ("fold", "val_waf", "val_acc",
                                                                            "best_epoch", "epochs",
                                                                            "resumed_from", "seconds")}
                                                         for r in records],
        "waf": weighted_f1(y_oof, pred_oof), "accuracy": accuracy(y_oof, pred_oof),
        "per_class_f1": per_class_f1(y_oof, pred_oof),
        "cv_waf_mean": float(np.mean([r["val_waf"] for r in records])),
        "test": None,
    }
    weights_report: dict[str, Any] = {"modalities": mods, "oof": weight_summary(y_oof, w_oof, mods)}
    cm, cm_title = confusion(y_oof, pred_oof), "out-of-fold"

    test = None
    if any(s == "test" for s in split_of.values()):
        test = score_split(features_uri, out_uri, mods, "test")
    if test is not None:
        p = np.stack([test.column(c).to_numpy() for c in PROB_COLUMNS], axis=1).astype(np.float32)
        w = np.stack([test.column(f"weight_{m}").to_numpy() for m in mods], axis=1).astype(np.float32)
        labels = test.column("label").to_pylist()
        storage.write_table(storage.join(out_uri, "test_predictions.parquet"),
                            prediction_table(test.column("clip_id").to_pylist(), labels, p, w, mods))
        y_t = np.array([LABEL_INDEX.get(lab, -1) if lab else -1 for lab in labels], dtype=np.int64)
        has = y_t >= 0
        if has.any():
            pred_t = p[has].argmax(axis=1)
            metrics["test"] = {"waf": weighted_f1(y_t[has], pred_t), "accuracy": accuracy(y_t[has], pred_t),
                               "per_class_f1": per_class_f1(y_t[has], pred_t), "n": int(has.sum())}
            weights_report["test"] = weight_summary(y_t[has], w[has], mods)
            cm, cm_title = confusion(y_t[has], pred_t), "test split (fold ensemble)"
    metrics["confusion"] = cm.tolist()
    metrics["confusion_source"] = cm_title
    plot_confusion(cm, storage.join(out_uri, "confusion_matrix.png"), title=f"confusion matrix — {cm_title}")
    # Headline per-class weights: test split when labelled, else OOF.
    src = weights_report.get("test") or weights_report["oof"]
    weights_report["per_class"] = src["per_class"]
    weights_report["overall"] = src["overall"]
    storage.write_json(storage.join(out_uri, "modality_weights.json"), weights_report)
    return metrics
