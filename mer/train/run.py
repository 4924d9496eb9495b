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
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS, MerConfig, TrainConfig, dump_config, with_overrides
from mer.evaluation.metrics import accuracy, confusion, per_class_f1, plot_confusion, weighted_f1
from mer.evaluation.report import write_run_report
from mer.runs.layout import model_file
from mer.runs.provenance import store_record
from mer.runtime.placement import ensure_placeable, train_demands
from mer.runtime.session import init_ray, started_local
from mer.store import storage
from mer.store.data_context import data_context
from mer.store.parts import PartStore, iter_parts, read_dataset, read_parts
from mer.train.ensemble import load_ensemble
from mer.train.features import LABEL_INDEX, fits_in_mb, input_stats, label_index, modality_dims, table_stats
from mer.train.fold import controller_poll_interval, fit_spec, group_name, job_name, run_fits
from mer.train.results import plot_curves, prediction_table, weight_summary
from mer.train.service import active as active_service

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
    A label table whose labelled rows carry a ``fold`` (the label loop's refinement, decided per fold) gives
    CV rows with ``fold`` too: a clip's label and weight in fold k's training and validation (null: every fold).
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

    labelled = usable & ~pseudo
    per_fold = any(f is not None for f, k in zip(fold, labelled) if k)
    return pick(labelled, per_fold), pick(usable & pseudo, True), split_of, store_train


def _per_fold_labels(cv: pa.Table, folds: int, labels_uri: str | None
                     ) -> tuple[pa.Table, list[dict[str, tuple[int, float]]]]:
    """CV rows with a ``fold`` column (:func:`label_rows`) → one row per clip (its fold-free row, else its
    first) and, per fold, {clip: (label, weight)} of the rows decided for that fold."""
    by_fold: list[dict[str, tuple[int, float]]] = [{} for _ in range(folds)]
    if "fold" not in cv.column_names:
        return cv, by_fold
    ids, fold = cv.column("clip_id").to_pylist(), cv.column("fold").to_pylist()
    bad = sorted({f for f in fold if f is not None and not 0 <= f < folds})
    if bad:
        raise ValueError(f"label table {labels_uri}: labelled rows for folds {bad}, but train.folds={folds}")
    for c, y, w, f in zip(ids, cv.column("y").to_pylist(), cv.column("w").to_pylist(), fold):
        if f is not None:
            by_fold[f][c] = (int(y), float(w))
    first: dict[str, int] = {}
    for i, (c, f) in enumerate(zip(ids, fold)):
        if c not in first or (f is None and fold[first[c]] is not None):
            first[c] = i
    keep = sorted(first.values())
    return cv.take(pa.array(keep, pa.int64())).drop_columns(["fold"]), by_fold


def fold_assignment(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified, seeded fold index per row: scikit-learn's ``StratifiedKFold(folds, shuffle=True,
    random_state=seed)`` test folds, drawn here with NumPy (the same allocation and the same draws of
    ``RandomState(seed)``, so every earlier run's folds stay as they were; tests/test_folds.py compares them)
    because importing scikit-learn costs the driver over a second."""
    if len(y) < folds:
        raise ValueError(f"{len(y)} labelled rows cannot make {folds} folds")
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=len(LABELS))
    # Stratifying a class needs >= folds members; rarer ones are spread as one group.
    strat = np.where(counts[y] >= folds, y, -1)
    # Classes numbered in order of first appearance, each class's fold counts dealt round robin over the
    # sorted classes, then each class's block of fold indices shuffled (StratifiedKFold._make_test_folds).
    _, first, inverse = np.unique(strat, return_index=True, return_inverse=True)
    _, perm = np.unique(first, return_inverse=True)
    encoded = perm[inverse.reshape(-1)]
    n_classes = len(first)
    ordered = np.sort(encoded)
    allocation = np.asarray([np.bincount(ordered[i::folds], minlength=n_classes) for i in range(folds)])
    rng = np.random.RandomState(seed)
    out = np.empty(len(y), dtype=np.int64)
    for k in range(n_classes):
        block = np.arange(folds).repeat(allocation[:, k])
        rng.shuffle(block)
        out[encoded == k] = block
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
class RunPlan:
    """One k-fold run of a training job, prepared on the driver: its directory started (config, model spec),
    labels and folds resolved, the folds left to train; :meth:`commit` writes a fold's outputs and commit record
    as the job hands them back, :meth:`finish` the run's tables, plots, test scoring and ``metrics.json``.

    ``done``: a finished run's metrics (``resume=True`` and ``metrics.json`` exists): nothing to train.
    """

    def __init__(self, cfg: MerConfig, store: PartStore, out_uri: str, *, resume: bool, labels_uri: str | None,
                 modalities: list[str] | None, run_name: str | None) -> None:
        from mer.fusion import build_model  # lazy: mer.fusion imports torch (a light path never needs it)

        self.t_start = time.time()
        self.out_uri, self.labels_uri, self.store = out_uri, labels_uri, store
        self.run_name = run_name or out_uri.rstrip("/").rsplit("/", 1)[-1]
        self.metrics_uri = storage.join(out_uri, "metrics.json")
        self.done: dict | None = None
        self.metrics: dict | None = None  # set by finish
        if resume and storage.exists(self.metrics_uri):
            log.info("run %s already finished; resume returns its metrics", out_uri)
            self.done = storage.read_json(self.metrics_uri)
            return
        if not resume:
            # Starting over: stale checkpoints would otherwise be picked up by Ray Train (same run names).
            for sub in ("ray", "folds", "models"):
                storage.delete_dir(storage.join(out_uri, sub))
            if storage.exists(self.metrics_uri):
                fs, path = storage.filesystem(self.metrics_uri)
                fs.delete_file(path)
        mods = resolve_modalities(cfg, store, modalities)
        self.cfg = cfg = with_overrides(cfg, [f"train.modalities=[{','.join(mods)}]"])
        self.mods = mods
        tc = cfg.train
        self.dims = modality_dims(store, mods)
        # What the model's inputs are: scoring checks (or reproduces) the extraction it was trained on.
        self.spec = {**build_model(tc.model, self.dims, tc).spec(), "features": store_record(store)}
        storage.write_text(storage.join(out_uri, "config.yaml"), dump_config(cfg))
        storage.write_json(model_file(out_uri), self.spec)

        cv, pseudo, self.split_of, store_train = label_rows(store, labels_uri)
        cv, self.cv_by_fold = _per_fold_labels(cv, tc.folds, labels_uri)
        self.cv_ids = cv.column("clip_id").to_pylist()
        self.cv_y = np.asarray(cv.column("y").to_numpy(), np.int64)
        self.cv_w = np.asarray(cv.column("w").to_numpy(), np.float32)
        self.fold_of = cv_folds(store_train, self.cv_ids, tc.folds, tc.seed)
        pseudo_fold = pseudo.column("fold").to_pylist()
        bad_folds = sorted({f for f in pseudo_fold if f is not None and not 0 <= f < tc.folds})
        if bad_folds:
            raise ValueError(f"label table {labels_uri}: pseudo rows for folds {bad_folds}, but train.folds="
                             f"{tc.folds} (per-fold pseudo-labels need the folds they were chosen for)")
        # Per fold: (label, weight) of the pseudo rows that train it (fold null: every fold).
        self.pseudo_by_fold: list[dict[str, tuple[int, float]]] = [{} for _ in range(tc.folds)]
        for c, y, w, f in zip(pseudo.column("clip_id").to_pylist(), pseudo.column("y").to_pylist(),
                              pseudo.column("w").to_pylist(), pseudo_fold):
            for k in (range(tc.folds) if f is None else (f,)):
                self.pseudo_by_fold[k][c] = (int(y), float(w))
        self.pseudo_ids = {c for d in self.pseudo_by_fold for c in d}
        log.info("train_run %s: %d CV rows, %d pseudo-labelled clips, %d folds, modalities %s", out_uri,
                 len(self.cv_ids), len(self.pseudo_ids), tc.folds, mods)
        self.records: dict[int, dict] = {}
        self.skipped: list[int] = []
        self.todo: list[int] = []
        for k in range(tc.folds):
            record_uri = storage.join(out_uri, "folds", f"fold_{k}.json")
            if resume and storage.exists(record_uri):
                self.records[k] = storage.read_json(record_uri)
                self.skipped.append(k)
            else:
                self.todo.append(k)
        self.targets = {k: self.fold_targets(k) for k in self.todo}
        self.input_stats: tuple[list[float], list[float]] | None = None
        self.timing: dict[str, Any] = {"groups": []}

    @property
    def stats_ids(self) -> set[str]:
        """The rows the run's input statistics are taken over: every clip it trains on."""
        return set(self.cv_ids) | self.pseudo_ids

    def fold_targets(self, k: int) -> tuple[dict, dict]:
        """Fold ``k``'s (training, validation) clips: clip id -> (label index, weight)."""
        tr = self.fold_of != k
        own = self.cv_by_fold[k]  # labels decided for this fold (a per-fold refinement), else the clip's one
        train_targets = {c: own.get(c, (int(y), float(w)))
                         for c, y, w, t in zip(self.cv_ids, self.cv_y, self.cv_w, tr) if t}
        val_targets = {c: (own.get(c, (int(y), 1.0))[0], 1.0) for c, y, t in zip(self.cv_ids, self.cv_y, tr) if not t}
        # A labelled clip keeps its own label; a validation clip never trains, not even as a pseudo-label.
        train_targets.update({c: t for c, t in self.pseudo_by_fold[k].items()
                              if c not in train_targets and c not in val_targets})
        return train_targets, val_targets

    def fits(self, tag: str | None) -> list[dict[str, Any]]:
        """The job's fit specs of this run's unfinished folds; keyed ``<k>`` (``tag`` None: a job of this run
        alone, checkpoint folders ``fold_<k>/`` as before jobs held several runs) or ``<tag>.<k>``."""
        train = self.cfg.train.model_dump(mode="json")
        return [fit_spec(str(k) if tag is None else f"{tag}.{k}", k, train=train, arch=self.cfg.train.model,
                         dims=self.dims, targets=self.targets[k], input_stats=self.input_stats, run=self.run_name)
                for k in self.todo]

    def commit(self, k: int, res: dict[str, Any]) -> dict:
        """Fold ``k``'s model and out-of-fold predictions, then its commit record (``folds/fold_<k>.json``: the
        fold is finished; a resumed run skips it)."""
        train_targets, val_targets = self.targets[k]
        storage.write_bytes(storage.join(self.out_uri, "models", f"fold_{k}.pt"), res["best"])
        vp = res["val_pred"].sort_by("clip_id")
        storage.write_bytes(storage.join(self.out_uri, "folds", f"oof_{k}.parquet"), _table_bytes(vp))
        st = res["state"]
        record = {"fold": k, "best_epoch": st["best_epoch"], "val_waf": st["best_waf"],
                  "val_acc": next((r["val_acc"] for r in st["history"] if r["epoch"] == st["best_epoch"]), None),
                  "epochs": st["epoch"], "n_train": len(train_targets), "n_val": len(val_targets),
                  "n_pseudo": len(self.pseudo_by_fold[k]), "resumed_from": st["resumed_from"],
                  "seconds": round(st["finished_at"] - st["started_at"], 2), "started_at": st["started_at"],
                  "engine_s": round(float(st.get("engine_s", 0.0)), 3),
                  "finished_at": st["finished_at"], "history": st["history"],
                  "checkpoint": str(res["checkpoint_path"]), "config_hash": self.cfg.hash()}
        storage.write_json(storage.join(self.out_uri, "folds", f"fold_{k}.json"), record)
        self.records[k] = record
        return record

    def finish(self, t_train: float) -> dict:
        """The run directory's tables, plots, test scoring, ``metrics.json`` and report; returns the metrics."""
        records = [self.records[k] for k in sorted(self.records)]
        t_fin = time.time()
        metrics = _finish_run(self.cfg, self.store, self.out_uri, records, self.mods, self.split_of)
        # Where the run's wall time went (mer bench train reads it): the driver's preparation (Ray, the store's
        # rows, input statistics), the worker groups (shared by every run of a job), and the run directory's
        # tables, plots and test scoring.
        timing = {**self.timing, "prepare_s": round(t_train - self.t_start, 3), "train_s": round(t_fin - t_train, 3)}
        metrics.update({"skipped_folds": self.skipped, "seconds": round(time.time() - self.t_start, 2),
                        "run_name": self.run_name, "labels": self.labels_uri,
                        "n_cv": len(self.cv_ids), "n_pseudo": len(self.pseudo_ids), "features": self.store.uri,
                        "features_config_hash": self.spec["features"]["config_hash"]})
        timing["finish_s"] = round(time.time() - t_fin, 3)
        metrics["timing"] = timing
        storage.write_json(self.metrics_uri, metrics)
        _write_report(self.out_uri)
        metrics["timing"]["report_s"] = round(time.time() - t_fin - timing["finish_s"], 3)
        log.info("train_run %s: fold val WAF %s, CV mean %.4f; %.0f s", self.out_uri,
                 " ".join(f"{r['val_waf']:.3f}" for r in records), metrics["cv_waf_mean"], metrics["seconds"])
        return metrics


def train_run(cfg: MerConfig, features_uri: str | PartStore, out_uri: str, *, resume: bool = False,
              labels_uri: str | None = None, modalities: list[str] | None = None,
              run_name: str | None = None, callbacks: list[Any] | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None) -> dict:
    """k-fold training of ``cfg.train.model`` on a feature store (its URI, or the store opened once by the caller:
    every read of it here shares one listing); writes the run directory, returns metrics.

    ``resume=True`` returns a finished run's metrics as they are, skips finished folds and continues the
    unfinished one from its latest Ray Train checkpoint; ``resume=False`` starts over (clears checkpoints).
    ``labels_uri``: label table (clip_id, label, weight, source) overriding labels and sample weights.
    ``modalities`` restricts the branches (ablations). ``progress``: called with every epoch's report when the
    run trains on a fit service (:mod:`mer.train.service`). ``callbacks``: Ray Train ``UserCallback``s given to
    every group's controller (progress reporting, experiment tracking; tests inject worker failures with one),
    see :func:`mer.train.fold.run_fits`. Folds train in ``train.parallel_folds`` groups at once, each group's
    folds in turn in one worker group (checkpoints in ``<out>/ray/folds_<k>_…``). Needs a Ray connection
    (started locally if none).
    """
    return train_runs(cfg, features_uri, [RunRequest(out_uri, labels_uri, modalities, run_name)], resume=resume,
                      callbacks=callbacks, progress=progress)[0]


class RunRequest(NamedTuple):
    """One run of :func:`train_runs`: its directory, label table, modalities and name (as for :func:`train_run`)."""

    out_uri: str
    labels_uri: str | None = None
    modalities: list[str] | None = None
    run_name: str | None = None


def train_runs(cfg: MerConfig, features_uri: str | PartStore, runs: list[RunRequest], *, resume: bool = False,
               job_dir: str | None = None, groups: int | None = None,
               callbacks: list[Any] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
    """Several k-fold runs on one store (each as :func:`train_run` would train it, same run directories and
    figures) as ONE training job: every unfinished fold of every run is a fit of the same Ray Train job, so
    the worker group's start-up, imports, data hand-over and (per model shape) DeepSpeed engine are paid once
    for all of them. Returns each run's metrics, in ``runs``' order.

    The fits are dealt to ``groups`` worker groups (default ``train.parallel_folds``; a run alone keeps its
    groups of folds, ``<out>/ray/folds_<k>_…``); several runs' job checkpoints go under ``job_dir`` (default:
    the first unfinished run's ``ray/``), named by their fits (:func:`mer.train.fold.job_name`), so a re-run
    with ``resume=True`` continues the job at its first unfinished fit. A fold's outputs and commit record are
    written once its group hands it back; a failed group fails the job after the others finish, so their
    commit records survive. Runs that share their training rows share one input-statistics pass; all share one
    copy of the store's rows: a materialised Ray dataset, or on a small store (``train.driver_rows_mb``) one Arrow
    table read on the driver and put in the object store.
    """
    t0 = time.time()
    if resume and all(storage.exists(storage.join(r.out_uri, "metrics.json")) for r in runs):
        for r in runs:
            log.info("run %s already finished; resume returns its metrics", r.out_uri)
        return [storage.read_json(storage.join(r.out_uri, "metrics.json")) for r in runs]
    cfg = init_ray(cfg)
    ensure_placeable(f"training {runs[0].out_uri}", train_demands(cfg, one_fold=True))
    client = active_service()
    if client is not None and not callbacks and cfg.train.driver_rows_mb > 0:
        client.warm()  # a fit service's groups start while the runs are prepared here
    if not resume and job_dir is not None:
        # Starting over: the job's stale checkpoints would otherwise be restored by Ray Train (same job names).
        storage.delete_dir(job_dir)
    store = PartStore.of(features_uri)
    plans = [RunPlan(cfg, store, r.out_uri, resume=resume, labels_uri=r.labels_uri, modalities=r.modalities,
                     run_name=r.run_name) for r in runs]
    for p in plans:
        p.t_start = t0
    live = [p for p in plans if p.done is None]
    if live:
        _train_job(cfg, store, live, job_dir=job_dir, groups=groups, callbacks=callbacks, progress=progress)
    return [p.done if p.done is not None else p.metrics for p in plans]


def _train_job(cfg: MerConfig, store: PartStore, plans: list[RunPlan], *, job_dir: str | None,
               groups: int | None, callbacks: list[Any] | None,
               progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Train the unfinished folds of ``plans`` as one job, commit them, finish every run (``plan.metrics``)."""
    mods: list[str] = []
    for p in plans:
        mods += [m for m in p.mods if m not in mods]
    dims = {m: d for p in plans for m, d in p.dims.items()}
    base: Any = None  # the rows as a materialised Ray dataset (a large store) ...
    rows_ref: Any = None  # ... or as one Arrow table in the object store (a small one)
    parts: list[pa.Table] = []
    small = driver_rows(cfg, store, mods, dims, plans)
    # A fit service open in this process (mer.train.service) trains a small store's fits on its warm worker
    # groups; its workers read the rows themselves. Ray Train callbacks belong to a job's own trainer.
    client = active_service() if small and not callbacks else None
    if client is not None:
        parts = list(store.iter(columns=mods))  # for the input statistics only
    elif small:
        # A small store: its parts read here with pyarrow, one row per clip as Ray Data's reader gives them,
        # and put in the object store once for every worker of the job. No read tasks, no Ray Data actors, and no
        # worker waits for its shard from the worker group's dataset actor: on a small store those start-ups cost
        # more than the read.
        import ray

        parts = list(store.iter(columns=mods))
        rows_ref = ray.put(pa.concat_tables(parts, promote_options="default"))
    else:
        # Ray Data, not the driver, holds the vectors; materialised once so that the training workers (which
        # may hold every CPU of a small cluster) never wait for read tasks.
        with quiet_data():
            base = read_dataset(store, columns=mods).materialize()
    # Input statistics per distinct set of training rows, over every modality at once; a run takes its own
    # modalities' values (a modality's statistics do not depend on the others'). Over the driver's parts the
    # moments are summed per part, as Ray Data sums them per block (a part is read as one block).
    by_rows: dict[frozenset, tuple[list[float], list[float]]] = {}
    for p in plans:
        if not p.cfg.train.standardize_inputs or not p.todo:
            continue
        ids = frozenset(p.stats_ids)
        if ids not in by_rows:
            if base is None:
                by_rows[ids] = table_stats(parts, mods, dims, set(ids))
            else:
                with quiet_data():
                    by_rows[ids] = input_stats(base, mods, dims, set(ids))
        p.input_stats = _stats_for(by_rows[ids], mods, dims, p.mods)
    parts.clear()  # the object store holds the rows from here on
    for p in plans:
        p.timing["rows"] = "service" if client is not None else "driver" if rows_ref is not None else "ray_data"

    single = len(plans) == 1
    tagged = {p.run_name: p for p in plans}
    if len(tagged) != len(plans):  # names key the fits: fall back to positions
        tagged = {f"run{i}": p for i, p in enumerate(plans)}
    fits = [f for tag, p in tagged.items() for f in p.fits(None if single else tag)]
    owner = {f["key"]: (p, f["fold"]) for tag, p in tagged.items() for f in p.fits(None if single else tag)}
    n_groups = max(1, min(groups or cfg.train.parallel_folds, len(fits))) if fits else 0
    if single:
        # A run alone: fold k in group k mod parallel_folds, named by its folds as before jobs held several runs.
        n_groups = min(cfg.train.parallel_folds, cfg.train.folds)
        dealt = [g for g in ([f for f in fits if f["fold"] % n_groups == i] for i in range(n_groups)) if g]
        ray_dir = storage.join(plans[0].out_uri, "ray")
        jobs = [(g, ray_dir, group_name([f["fold"] for f in g])) for g in dealt]
    else:
        dealt = [g for g in (fits[i::n_groups] for i in range(n_groups)) if g]
        ray_dir = job_dir or storage.join(plans[0].out_uri, "ray")
        jobs = [(g, ray_dir, job_name([f["key"] for f in g])) for g in dealt]
    if client is not None:
        _train_on_service(client, store, plans, fits, owner, mods, dims, progress)
        return
    if len(plans) > 1:
        log.info("training job: %d runs, %d fits in %d worker group(s) (%s)", len(plans), len(fits), len(jobs),
                 ", ".join(p.run_name for p in plans))

    def fit_group(job: tuple[list[dict], str, str]) -> None:
        group, where, name = job
        results = run_fits(cfg, group, dataset=base, rows=rows_ref, ray_dir=where, name=name, callbacks=callbacks)
        for f in group:
            plan, k = owner[f["key"]]
            plan.commit(k, results[f["key"]])
        timing = {"fits": [f["key"] for f in group], **results[group[0]["key"]]["group_timing"]}
        for plan in {id(owner[f["key"]][0]): owner[f["key"]][0] for f in group}.values():
            plan.timing["groups"].append(timing)

    # Groups train at once: TorchTrainer.fit is safe to call from driver threads (it only installs its SIGINT
    # handler on the main thread), and Ray schedules the worker groups as resources allow. A failed group
    # fails the job after the others finish, so their commit records survive for resume=True (and the failed
    # group's checkpoint keeps the fits it finished).
    t_train = time.time()
    with controller_poll_interval(cfg.train.poll_interval_s, preemption_watcher=not started_local()):
        if len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="mer-folds") as pool:
                futures = [(g, pool.submit(fit_group, g)) for g in jobs]
            errors = [(g, f.exception()) for g, f in futures if f.exception() is not None]
            if errors:
                (group, _, _), err = errors[0]  # groups are in order of their first fit
                failed = [f["key"] for (g, _, _), _ in errors for f in g]
                what = "folds" if single else "fits"
                shown = sorted(int(k) for k in failed) if single else failed
                raise RuntimeError(f"{what} {shown} failed (first: {'fold' if single else 'fit'} "
                                   f"{group[0]['key']}: {err})") from err
        else:
            for g in jobs:
                fit_group(g)
    for p in plans:
        p.timing["job_runs"] = len(plans)
        p.metrics = p.finish(t_train)


def _train_on_service(client: Any, store: PartStore, plans: list[RunPlan], fits: list[dict[str, Any]],
                      owner: dict[str, tuple[RunPlan, int]], mods: list[str], dims: dict[str, int],
                      progress: Callable[[dict[str, Any]], None] | None) -> None:
    """The job's fits handed to a fit service's warm worker groups; each fold committed as it is answered (a
    failed service leaves the answered folds committed, for ``resume=True``), then every run finished."""
    if len(plans) > 1:
        log.info("training job: %d runs, %d fits on the fit service (%s)", len(plans), len(fits),
                 ", ".join(p.run_name for p in plans))

    def commit(key: str, res: dict[str, Any]) -> None:
        plan, k = owner[key]
        plan.commit(k, res)
        plan.timing["groups"].append({"fits": [key], **res["group_timing"]})

    t_train = time.time()
    client.run(fits, store=store, mods=mods, dims=dims, on_result=commit, on_progress=progress)
    for p in plans:
        p.timing["job_runs"] = len(plans)
        p.metrics = p.finish(t_train)


def driver_rows(cfg: MerConfig, store: PartStore, mods: list[str], dims: dict[str, int], plans: list[RunPlan]
                ) -> bool:
    """Whether a job reads its store's rows on the driver (``train.driver_rows_mb``): the rows' vectors of
    ``mods`` fit in that many MiB as float32, and every run caches its rows in the workers (streaming them per
    epoch is Ray Data's)."""
    limit = cfg.train.driver_rows_mb
    if limit <= 0 or not all(p.cfg.train.cache_shards for p in plans):
        return False
    # The stored ids come with the label read that prepared the runs (PartStore caches each part's keys).
    return fits_in_mb(len(store.ids()), (dims[m] for m in mods), limit)


def _stats_for(stats: tuple[list[float], list[float]], mods: list[str], dims: dict[str, int], want: list[str]
               ) -> tuple[list[float], list[float]]:
    """``want``'s part (in ``want``'s order) of input statistics taken over ``mods``."""
    start, offset = {}, 0
    for m in mods:
        start[m] = offset
        offset += dims[m]
    mean, std = stats
    return ([v for m in want for v in mean[start[m]:start[m] + dims[m]]],
            [v for m in want for v in std[start[m]:start[m] + dims[m]]])


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
