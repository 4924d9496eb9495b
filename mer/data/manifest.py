"""The manifest: one row per clip (``clip_id, video_uri, audio_uri, text, label, split``), Parquet or CSV.

Every reader of a manifest goes through :func:`read_manifest`, so a bad file fails once, at the start, with
the offending clip named, instead of deep inside a Ray stage. Extra columns (e.g. a ``caption`` used as
enrichment context) are kept after the standard ones.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from mer.config import LABELS
from mer.store import storage

# All fields are nullable at the Arrow level (so tables concatenate with ones built elsewhere); the
# non-null rules (clip_id, video_uri, labels of train/test rows) are enforced by validate_manifest.
MANIFEST_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string()),
    pa.field("video_uri", pa.string()),
    pa.field("audio_uri", pa.string()),
    pa.field("text", pa.string()),
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
])
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = ("clip_id", "video_uri")
SPLITS: tuple[str, ...] = ("train", "unlabeled", "test")


class ManifestError(ValueError):
    """A manifest violates the contract; the message names the offending clip (or row) and value."""


def _is_csv(uri: str) -> bool:
    return str(uri).lower().endswith(".csv")


def validate_manifest(table: Any, source: str = "manifest") -> pa.Table:
    """Check and normalise a manifest table; return it with the standard columns first, as strings.

    Rules: ``clip_id`` and ``video_uri`` columns are required; ``audio_uri``/``text``/``label`` are added as
    nulls when absent; a missing ``split`` column is derived (``train`` where a label is set, else
    ``unlabeled``). ``clip_id`` must be non-empty and unique, ``label`` one of :data:`mer.config.LABELS` or
    null, ``split`` one of ``train|unlabeled|test``, and ``train``/``test`` rows need a label.
    Raises :class:`ManifestError` (a ``ValueError``) naming the first offending clip.
    """
    if not isinstance(table, pa.Table):
        # pandas DataFrame convenience; everything else goes through Arrow.
        table = pa.Table.from_pandas(table, preserve_index=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{source}: missing required column(s) {missing} (has {table.column_names})")
    n = table.num_rows
    cols: dict[str, pa.Array] = {}
    for name in MANIFEST_COLUMNS:
        if name in table.column_names:
            col = table.column(name)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
                try:
                    col = col.cast(pa.string())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ManifestError(f"{source}: column {name!r} of type {col.type} is not a string") from e
            cols[name] = col.cast(pa.string()).combine_chunks()
    for name in ("audio_uri", "text", "label"):
        cols.setdefault(name, pa.nulls(n, pa.string()))

    ids = cols["clip_id"].to_pylist()
    labels = cols["label"].to_pylist()
    seen: dict[str, int] = {}
    for i, cid in enumerate(ids):
        if cid is None or not str(cid).strip():
            raise ManifestError(f"{source}: row {i} has an empty clip_id")
        if cid in seen:
            raise ManifestError(f"{source}: duplicate clip_id {cid!r} (rows {seen[cid]} and {i})")
        seen[cid] = i
    known = set(LABELS)
    for cid, lab in zip(ids, labels):
        if lab is not None and lab not in known:
            raise ManifestError(f"{source}: clip {cid!r} has unknown label {lab!r} (expected one of {list(LABELS)} "
                                f"or null)")
    if "split" in cols:
        splits = cols["split"].to_pylist()
        for cid, sp, lab in zip(ids, splits, labels):
            if sp not in SPLITS:
                raise ManifestError(f"{source}: clip {cid!r} has unknown split {sp!r} (expected one of {list(SPLITS)})")
            if sp in ("train", "test") and lab is None:
                raise ManifestError(f"{source}: clip {cid!r} is in split {sp!r} but has no label")
    else:
        cols["split"] = pa.array(["train" if lab is not None else "unlabeled" for lab in labels], pa.string())

    videos = cols["video_uri"].to_pylist()
    for cid, v in zip(ids, videos):
        if v is None or not str(v).strip():
            raise ManifestError(f"{source}: clip {cid!r} has no video_uri")

    arrays = [cols[c] for c in MANIFEST_COLUMNS]
    fields = list(MANIFEST_SCHEMA)
    for name in table.column_names:
        if name not in MANIFEST_COLUMNS:
            arrays.append(table.column(name).combine_chunks())
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_manifest(uri: str) -> pa.Table:
    """Read and validate a manifest: CSV when the name ends in ``.csv``, else Parquet (file or directory of
    parts), local or ``s3://``. Raises :class:`ManifestError` naming the bad row (see :func:`validate_manifest`).
    """
    uri = str(uri)
    if _is_csv(uri):
        # Every standard column is text: clip ids such as 00012 must not become integers. An empty CSV field
        # reads as null (an empty subtitle and a missing one are the same thing downstream).
        table = pacsv.read_csv(
            io.BytesIO(storage.read_bytes(uri)),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                 column_types={c: pa.string() for c in MANIFEST_COLUMNS}))
    else:
        table = storage.read_table(uri)
    return validate_manifest(table, source=uri)


def write_manifest(table: Any, uri: str) -> pa.Table:
    """Validate ``table`` (Arrow or pandas) and write it to ``uri`` atomically, CSV or Parquet by suffix.

    Returns the validated table that was written.
    """
    uri = str(uri)
    table = validate_manifest(table, source=uri)
    if _is_csv(uri):
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        storage.write_bytes(uri, buf.getvalue())
    else:
        storage.write_table(uri, table)
    return table


def manifest_from_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """A validated manifest table from row dicts (missing optional keys become null)."""
    cols = {c: [r.get(c) for r in rows] for c in MANIFEST_COLUMNS}
    table = pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)
    return validate_manifest(table)
