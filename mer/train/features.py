"""Feature-store rows → model inputs (the layout of :mod:`mer.fusion.base`), vector sizes and input statistics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mer.config import LABELS, MerConfig
from mer.store.parts import PartStore

LABEL_INDEX = {lab: k for k, lab in enumerate(LABELS)}


def vector_matrix(column: pa.ChunkedArray | pa.Array | None, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A nullable ``list<float>`` column → (``[n, dim]`` float32 with zeros where missing, present mask).

    A vector that is null, has the wrong length or holds a non-finite value counts as missing, so one bad
    row never poisons a batch.
    """
    out = np.zeros((n, dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    if column is None:
        return out, present
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_list(column.type):
        column = column.cast(pa.list_(pa.float32()))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ok = column.is_valid().to_numpy(zero_copy_only=False) & (np.nan_to_num(lengths, nan=-1) == dim)
    if ok.any():
        flat = pc.list_flatten(column.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
        vals = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
        finite = np.isfinite(vals).all(axis=1)
        idx = np.flatnonzero(ok)
        out[idx[finite]] = vals[finite]
        present[idx[finite]] = True
    return out, present


def table_inputs(table: pa.Table, modalities: list[str], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a feature table → (``x [N, sum(dims)]`` float32, ``mask [N, M]`` bool) in modality order.

    A modality column absent from the table is missing for every row.
    """
    n = table.num_rows
    xs, masks = [], []
    for m in modalities:
        col = table.column(m) if m in table.column_names else None
        x, present = vector_matrix(col, dims[m], n)
        xs.append(x)
        masks.append(present)
    return np.concatenate(xs, axis=1), np.stack(masks, axis=1)


def _partial_moments(batch: pa.Table, modalities: list[str], dims: dict[str, int], ids: set[str] | None
                     ) -> pa.Table:
    """One row per batch: count, sum and sum of squares of each modality's present vectors."""
    if ids is not None:
        batch = batch.filter(pa.array([c in ids for c in batch.column("clip_id").to_pylist()], pa.bool_()))
    x, mask = table_inputs(batch, modalities, dims)
    cols: dict[str, list] = {}
    start = 0
    for j, m in enumerate(modalities):
        v = x[mask[:, j], start:start + dims[m]].astype(np.float64)
        start += dims[m]
        cols[f"{m}.n"] = [int(v.shape[0])]
        cols[f"{m}.sum"] = [v.sum(axis=0).tolist()]
        cols[f"{m}.sumsq"] = [(v * v).sum(axis=0).tolist()]
    return pa.table(cols)


def input_stats(ds: object, modalities: list[str], dims: dict[str, int], ids: set[str] | None = None
                ) -> tuple[list[float], list[float]]:
    """Per-dimension mean and standard deviation of the present vectors of ``modalities`` over the rows of
    the Ray dataset ``ds`` (restricted to ``ids``), in model input order. The workers reduce their blocks
    to sums, so the driver only ever sees one row of moments per block. A modality with no present vector
    gets mean 0, std 1."""
    rows = ds.map_batches(_partial_moments, fn_kwargs={"modalities": modalities, "dims": dims, "ids": ids},  # type: ignore[attr-defined]
                          batch_format="pyarrow", batch_size=None).take_all()
    return _combine_moments(rows, modalities, dims)


def table_stats(tables: Iterable[pa.Table], modalities: list[str], dims: dict[str, int],
                ids: set[str] | None = None) -> tuple[list[float], list[float]]:
    """:func:`input_stats` over Arrow tables held by the driver (a small store's parts, read with pyarrow):
    the same moments per table, summed in the same way, so a table per part gives the figures a Ray dataset
    of one block per part gives."""
    rows = [_partial_moments(t, modalities, dims, ids).to_pylist()[0] for t in tables]
    return _combine_moments(rows, modalities, dims)


def _combine_moments(rows: list[dict], modalities: list[str], dims: dict[str, int]
                     ) -> tuple[list[float], list[float]]:
    """Mean and standard deviation, in model input order, from :func:`_partial_moments` rows."""
    means: list[np.ndarray] = []
    stds: list[np.ndarray] = []
    for m in modalities:
        n = sum(int(r[f"{m}.n"]) for r in rows)
        if n == 0:
            means.append(np.zeros(dims[m]))
            stds.append(np.ones(dims[m]))
            continue
        s1 = np.sum([np.asarray(r[f"{m}.sum"], np.float64) for r in rows if r[f"{m}.n"]], axis=0)
        s2 = np.sum([np.asarray(r[f"{m}.sumsq"], np.float64) for r in rows if r[f"{m}.n"]], axis=0)
        mean = s1 / n
        means.append(mean)
        stds.append(np.sqrt(np.maximum(s2 / n - mean * mean, 0.0)))
    return np.concatenate(means).tolist(), np.concatenate(stds).tolist()


def modality_dims(features: str | PartStore, modalities: list[str]) -> dict[str, int]:
    """Vector size of each modality: the length of its first non-null vector in the store.

    Reads one column at a time, part by part, only until a vector is found.
    """
    store = PartStore.of(features)
    features_uri = store.uri
    cols = set(store.columns)
    missing = [m for m in modalities if m not in cols]
    if missing:
        raise ValueError(f"feature store {features_uri} has no column for modalities {missing}")
    dims: dict[str, int] = {}
    for m in modalities:
        for part in store.iter(columns=[m]):
            col = part.column(m).drop_null()
            if len(col):
                dims[m] = len(col[0].as_py())
                break
        else:
            raise ValueError(f"feature store {features_uri}: modality {m!r} has no vector in any row")
    return dims


def fits_in_mb(rows: int, dims: Iterable[int], limit_mb: float) -> bool:
    """Whether ``rows`` rows of vectors of sizes ``dims`` fit in ``limit_mb`` MiB as float32: the test by which a
    small store is read (``train.driver_rows_mb``) or scored (``score.driver_rows_mb``) on the driver."""
    return rows * sum(dims) * 4 <= limit_mb * 2**20


def scored_on_driver(cfg: MerConfig, dims: dict[str, int], rows: int) -> bool:
    """Whether scoring ``rows`` rows runs on the driver (``score.driver_rows_mb``): a CPU scoring whose rows'
    vectors (the run's modality sizes ``dims``) fit in that many MiB as float32. Here, below scoring, because a
    training job asks it too (a fit service holds CPUs that a scoring actor pool would wait for)."""
    limit = cfg.score.driver_rows_mb
    if limit <= 0 or cfg.score.resources.num_gpus > 0:
        return False
    return fits_in_mb(rows, dims.values(), limit)


def label_index(labels: list[str | None]) -> np.ndarray:
    """Label names → class indices (-1 for null/unknown)."""
    return np.array([LABEL_INDEX.get(str(lab).strip().lower(), -1) if lab is not None else -1
                     for lab in labels], dtype=np.int64)
