"""Batch scoring: a fold ensemble applied to a feature store (or raw videos) as a Ray Data job.

The classifier runs as an actor pool of model replicas (``score.resources``); the stream is written like
extraction's (:func:`mer.runtime.stream.write_stream`: the driver commits prediction parts atomically), so a re-run
skips clips already scored and the output holds every input clip exactly once. Raw videos go through the
extraction pipeline first (same resumable store).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS, MerConfig, with_overrides
from mer.extract.pipeline import extract_features, media_cache_dirs
from mer.runs.layout import best_run, run_id
from mer.runs.provenance import check_store, enrich_cache_of, extraction_config, media_caches_of
from mer.runtime.session import fit_here
from mer.runtime.stall import StallWatch
from mer.runtime.stream import Stage, build, write_stream
from mer.store import storage
from mer.store.parts import PartStore
from mer.train import load_ensemble
from mer.train.features import scored_on_driver as on_driver

log = logging.getLogger("mer.score")

PRED_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("split", pa.string()), ("label", pa.string()),
     ("pred_label", pa.string()), ("confidence", pa.float32()), ("fold_agreement", pa.float32())]
    + [(c, pa.float32()) for c in PROB_COLUMNS]
    # Each fold model's probabilities (fold order 0..F-1): the label loop picks fold k's pseudo-labels from
    # fold k's models only.
    + [("fold_probs", pa.list_(pa.list_(pa.float32())))]
    + [("run_id", pa.string()), ("status", pa.string()), ("error", pa.string())]
)


class EnsemblePredictor:
    """Callable class for ``map_batches``: loads the run's fold models once per actor."""

    def __init__(self, run_uri: str, device: str = "cpu", ensemble: Any = None) -> None:
        self.ensemble = ensemble if ensemble is not None else load_ensemble(run_uri, device=device)
        self.run_id = run_id(run_uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        mods = list(self.ensemble.modalities)
        present = np.zeros(n, dtype=bool)
        for m in mods:
            if m in batch.column_names:
                present |= np.asarray(batch.column(m).is_valid().to_numpy(zero_copy_only=False))
        probs = np.full((n, len(LABELS)), np.nan, dtype=np.float32)
        agree = np.full(n, np.nan, dtype=np.float32)
        fold_probs: list[list[list[float]] | None] = [None] * n
        if present.any():
            fold_p = self.ensemble.predict_proba(batch.filter(pa.array(present)))  # [n', folds, C]
            mean = fold_p.mean(axis=1)
            probs[present] = mean
            agree[present] = (fold_p.argmax(axis=2) == mean.argmax(axis=1)[:, None]).mean(axis=1)
            for i, fp in zip(np.flatnonzero(present), fold_p):
                fold_probs[i] = fp.tolist()
        pred = [LABELS[int(np.argmax(p))] if ok else None for p, ok in zip(probs, present)]
        upstream = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * n
        feat_status = (batch.column("status").to_pylist() if "status" in batch.column_names else ["ok"] * n)
        cols: dict[str, Any] = {
            "clip_id": batch.column("clip_id"),
            "split": batch.column("split") if "split" in batch.column_names else pa.nulls(n, pa.string()),
            "label": batch.column("label") if "label" in batch.column_names else pa.nulls(n, pa.string()),
            "pred_label": pred,
            "confidence": np.where(present, np.nanmax(np.nan_to_num(probs, nan=-1.0), axis=1), np.nan),
            "fold_agreement": agree,
        }
        for k, c in enumerate(PROB_COLUMNS):
            cols[c] = probs[:, k]
        cols["fold_probs"] = fold_probs
        cols["run_id"] = [self.run_id] * n
        # "partial": predicted from the modalities that survived a bad input (its error says which failed).
        cols["status"] = [("ok" if fs == "ok" else "partial") if ok else "no_features"
                          for ok, fs in zip(present, feat_status)]
        cols["error"] = [e if ok else (e or f"no usable modality among {mods}")
                         for ok, e in zip(present, upstream)]
        return pa.table(cols, schema=PRED_SCHEMA)


def _filter_ids(ids: frozenset[str], keep: bool):
    """A batch filter keeping (``keep=True``) or dropping the rows whose clip_id is in ``ids``."""

    def apply(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array([(i in ids) == keep for i in batch.column("clip_id").to_pylist()],
                                     type=pa.bool_()))

    return apply


def score_stages(cfg: MerConfig, run_uri: str, pending: list[str]) -> list[Stage]:
    """Feature-store rows → prediction rows: keep the ``pending`` clips, then the fold ensemble's actor pool."""
    r = cfg.score.resources
    return [Stage(name="pending", fn=_filter_ids(frozenset(pending), keep=True), inputs=("clip_id",),
                  kind="task", batch_format="pyarrow", map_args={"batch_size": None}),
            # Ray restarts a dead replica and re-sends its batches (the driver drops any repeated row).
            Stage(name="ensemble", fn=EnsemblePredictor, inputs=("clip_id",), outputs=tuple(PRED_SCHEMA.names),
                  resources=r, constructor_args=(run_uri, "cuda" if r.num_gpus > 0 else "cpu"),
                  batch_format="pyarrow", map_args={"max_restarts": -1, "max_task_retries": -1})]


def score_features(cfg: MerConfig, run_uri: str, features: str | PartStore, out_uri: str,
                   splits: list[str] | None = None, progress: str = "") -> dict:
    """Score every clip of a feature store (optionally only ``splits``) into ``out_uri`` parts. ``features``: the
    store's URI, or the store opened once by the caller (the label loop scores one store many times)."""
    t0 = time.time()
    store = PartStore.of(features)
    ensemble = load_ensemble(run_uri)
    modalities = list(ensemble.modalities)
    store_cols = store.read(columns=["split"])
    wanted = [cid for cid, sp in zip(store_cols.column("clip_id").to_pylist(),
                                     store_cols.column("split").to_pylist())
              if splits is None or sp in splits]
    have = set(store.columns)
    cols = [c for c in ["clip_id", "split", "label", "status", "error", *modalities] if c in have]
    local = on_driver(cfg, ensemble.dims, len(wanted))

    def stream(pending: list[str]) -> Any:
        if local:
            return _driver_batches(store, cols, EnsemblePredictor(run_uri, ensemble=ensemble), pending,
                                   cfg.score.resources.batch_size)
        return build(store.dataset(columns=cols), score_stages(cfg, run_uri, pending), cols)

    run = write_stream(out_uri, PRED_SCHEMA, cfg.score.rows_per_part, wanted, stream, label=progress,
                       restarts=cfg.score.stream_restarts,
                       watch=StallWatch.from_config(cfg, f"the scoring stream into {out_uri}"))
    summary: dict[str, Any] = {"out": out_uri, "total": run.wanted, "skipped_done": run.already,
                               "written": run.writer.rows_written, "stream_restarts": run.restarts,
                               "on_driver": local}
    written = PartStore(out_uri)  # listed after the stream wrote it
    preds = written.read(columns=["status"]) if written.parts else PRED_SCHEMA.empty_table()
    summary["status_counts"] = _counts(preds.column("status").to_pylist())
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _driver_batches(store: PartStore, cols: list[str], predictor: EnsemblePredictor, pending: list[str],
                    batch_size: int) -> Iterator[pa.Table]:
    """The pending rows of ``store`` scored on the driver, part by part, ``batch_size`` rows a call: the
    rows :func:`score_stages`' actor pool would return."""
    keep = _filter_ids(frozenset(pending), keep=True)
    for part in store.iter(columns=cols):
        rows = keep(part)
        for start in range(0, rows.num_rows, max(1, batch_size)):
            yield predictor(rows.slice(start, batch_size))


def _counts(values: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def write_submission(preds: pa.Table, uri: str, fallback: str = "neutral") -> int:
    """Write the MER2025 submission CSV (``name,discrete``): one row per clip, a fallback for failed rows."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "discrete"])
    rows = sorted(zip(preds.column("clip_id").to_pylist(), preds.column("pred_label").to_pylist()))
    for cid, lab in rows:
        w.writerow([cid, lab or fallback])
    storage.write_text(uri, buf.getvalue())
    return len(rows)


def score(cfg: MerConfig, run_uri: str, out_uri: str, *, features_uri: str | None = None,
          manifest_uri: str | None = None, features_out: str | None = None,
          splits: list[str] | None = None, allow_config_change: bool = False) -> dict:
    """``mer score``: predictions Parquet parts under ``out_uri/predictions`` + ``out_uri/submission.csv``.

    ``run_uri`` is a training run or a label-loop directory, which scores what its ``best`` names (the accepted
    stages' ensemble, or the best accepted stage).
    With ``manifest_uri`` the raw videos (of ``splits`` only, when given) are first run through the
    (resumable) extraction pipeline into ``features_out`` (default ``out_uri/features``), with the feature
    settings the run was trained on and, unless ``enrich.cache_dir`` is set, the enrichment cache its training
    store recorded (clips the run has seen are not generated again); bad inputs keep their extraction status
    and error. A ``features_uri`` store must have the config hash of the
    run's training store. ``allow_config_change`` lets either differ (logged) instead of refusing
    (:mod:`mer.runs.provenance`).
    """
    if (features_uri is None) == (manifest_uri is None):
        raise ValueError("score: give exactly one of features_uri or manifest_uri")
    run_uri, chosen = best_run(run_uri)
    summary: dict[str, Any] = {"run": run_uri}
    if chosen is not None:
        log.info("scoring the label loop's %s: %s (%s)", chosen["stage"], run_uri, chosen["why"])
        summary["stage"] = chosen
    if manifest_uri is not None:
        features_uri = features_out or storage.join(out_uri, "features")
        ex_cfg = fit_here(extraction_config(cfg, run_uri, allow_config_change=allow_config_change))
        cache = None
        if ex_cfg.enrich.enabled and not ex_cfg.enrich.cache_dir:
            cache = enrich_cache_of(run_uri)
            if cache:
                log.info("enrichment cache: %s (recorded by the run's training store)", cache)
        # The speech and description caches too: clips the run has seen are not transcribed or described again.
        runs_here = media_cache_dirs(ex_cfg, features_uri)  # the stages this extraction runs
        media = {stage: cache for stage, cache in media_caches_of(run_uri).items()
                 if stage in runs_here and getattr(ex_cfg.extract, stage).cache_dir is None}
        if media:
            ex_cfg = with_overrides(ex_cfg, [f"extract.{stage}.cache_dir={cache}" for stage, cache in media.items()])
            log.info("transcript/description caches: %s (recorded by the run's training store)",
                     ", ".join(f"{k} {v}" for k, v in media.items()))
        summary["extract"] = extract_features(ex_cfg, manifest_uri, features_uri, splits=splits,
                                              enrich_cache=cache)
        store = PartStore(features_uri)  # opened once extraction has written it
    else:
        assert features_uri is not None
        store = PartStore(features_uri)
        check_store(run_uri, store, allow_config_change=allow_config_change)
    pred_dir = storage.join(out_uri, "predictions")
    summary["score"] = score_features(cfg, run_uri, store, pred_dir, splits=splits, progress="score")
    preds = PartStore(pred_dir).read()
    summary["submission"] = storage.join(out_uri, "submission.csv")
    summary["submission_rows"] = write_submission(preds, summary["submission"])
    summary["predictions"] = pred_dir
    return summary
