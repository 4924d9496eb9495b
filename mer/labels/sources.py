"""Label sources as vote matrices: trained runs (out-of-fold on labelled rows, per fold on the pool) and tables.

Every source becomes a :class:`SourceVotes`: clip ids and, per clip, class probabilities ``[N, K]`` (one-hot
for label sources; NaN rows where it has no vote) or per-fold probabilities ``[N, F, K]`` (a run's fold models
on clips none of them trained on). Tables are Parquet or CSV with ``clip_id`` and either ``prob_<label>``
columns or a ``label`` (or ``discrete``) column; empty labels are "no vote", unknown labels fail naming the
source and the clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS
from mer.labels.evidence import K, one_hot
from mer.store import storage


@dataclass
class SourceVotes:
    """One source's votes: ``probs`` is ``[N, K]`` or, per fold, ``[N, F, K]``; NaN rows: no vote."""

    name: str
    kind: Literal["probs", "label"]
    ids: list[str]
    probs: np.ndarray

    @property
    def per_fold(self) -> bool:
        return self.probs.ndim == 3

    def rows(self, ids: list[str], folds: int | None = None) -> np.ndarray:
        """Votes for ``ids`` in that order (NaN where this source has none). A per-fold source gives
        ``[N, F, K]``; a fold-free one is repeated over ``folds`` when ``folds`` is given."""
        index = {c: i for i, c in enumerate(self.ids)}
        shape = (len(ids), *self.probs.shape[1:])
        out = np.full(shape, np.nan)
        pos = np.array([index.get(c, -1) for c in ids], dtype=np.int64)
        have = pos >= 0
        out[have] = self.probs[pos[have]]
        if folds is not None and not self.per_fold:
            out = np.repeat(out[:, None, :], folds, axis=1)
        return out


def _probs_matrix(table: pa.Table) -> np.ndarray:
    return np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                     for c in PROB_COLUMNS], axis=1)


def table_votes(name: str, table: pa.Table) -> SourceVotes:
    """A vote table → :class:`SourceVotes` (probabilities if it has every ``prob_<label>``, else labels)."""
    cols = set(table.column_names)
    if "clip_id" not in cols:
        raise ValueError(f"label source {name!r}: missing column clip_id")
    ids = [str(c) for c in table.column("clip_id").to_pylist()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label source {name!r}: clip_id values are not unique")
    if set(PROB_COLUMNS) <= cols:
        return SourceVotes(name, "probs", ids, _probs_matrix(table))
    label_col = "label" if "label" in cols else "discrete" if "discrete" in cols else None
    if label_col is None:
        raise ValueError(f"label source {name!r}: needs a label column or prob_<label> columns")
    labels = table.column(label_col).to_pylist()
    try:
        return SourceVotes(name, "label", ids, one_hot(labels))
    except ValueError:
        for cid, lab in zip(ids, labels):
            if lab is not None and str(lab).strip() and str(lab).strip().lower() not in LABELS:
                raise ValueError(f"label source {name!r}: clip {cid!r} has unknown label {lab!r}") from None
        raise


def read_source(name: str, uri: str) -> SourceVotes:
    """Read a vote table (Parquet file/directory or CSV; MER-style ``name`` works as ``clip_id``)."""
    if str(uri).endswith(".csv"):
        import io

        import pyarrow.csv as pacsv

        table = pacsv.read_csv(io.BytesIO(storage.read_bytes(uri)),
                               convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    else:
        table = storage.read_table(uri)
    if "clip_id" not in table.column_names and "name" in table.column_names:
        table = table.rename_columns(["clip_id" if c == "name" else c for c in table.column_names])
    return table_votes(name, table)


def parse_sources(items: list[str] | None) -> dict[str, str]:
    """``--source name=uri`` strings → {name: uri}; names must be unique and not reserved."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--source {item!r}: expected name=uri")
        name, uri = (s.strip() for s in item.split("=", 1))
        if not name or not uri:
            raise ValueError(f"--source {item!r}: expected name=uri")
        if name in out or name == "original":
            raise ValueError(f"--source {item!r}: source name {name!r} is used twice or reserved")
        out[name] = uri
    return out


def run_oof_votes(name: str, run_uri: str) -> SourceVotes:
    """A finished run's out-of-fold probabilities on its labelled (CV) rows."""
    oof = storage.read_table(storage.join(run_uri, "oof.parquet"))
    return SourceVotes(name, "probs", oof.column("clip_id").to_pylist(), _probs_matrix(oof))


def pool_votes(name: str, predictions: pa.Table, folds: int) -> SourceVotes:
    """Per-fold probabilities (``fold_probs``) of a run scored on the pool; rows without features: no vote."""
    ids = predictions.column("clip_id").to_pylist()
    out = np.full((len(ids), folds, K), np.nan)
    for i, fp in enumerate(predictions.column("fold_probs").to_pylist()):
        if fp is None:
            continue
        arr = np.asarray(fp, dtype=np.float64)
        if arr.shape != (folds, K):
            raise ValueError(f"source {name!r}: clip {ids[i]!r} has fold probabilities of shape {arr.shape}, "
                             f"expected ({folds}, {K})")
        out[i] = arr
    return SourceVotes(name, "probs", ids, out)
