"""The feature store: a directory (local or ``s3://``) of Parquet parts plus ``_meta.json``.

Exactly-once protocol: only the driver writes, and only whole parts (``storage.write_table`` is atomic:
temp file + rename locally, one PUT on S3), so a part is either complete or absent. A run first reads the
``clip_id``s of the existing parts (:func:`stored_ids`) and only processes the others; a run killed
mid-way loses just its uncommitted buffer, which the next run redoes. Parts are named per run
(``part-<run>-<seq>.parquet``) so runs never overwrite each other. Readers deduplicate by ``clip_id``
defensively (first committed part wins), so even two concurrent runs cannot yield a duplicate row.

Schema: docs/architecture.md ("Feature store"). The transcripts are stored as ``transcript`` and
``transcript_enriched`` because ``text``/``text_enriched`` name the text vectors (the training contract).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mer import storage
from mer.config import BRANCHES, MerConfig

SCHEMA_VERSION = 1
META_FILE = "_meta.json"
PART_PREFIX = "part-"

# Config sections that determine the feature values (resources/batch sizes do not).
FEATURE_SECTIONS = ("extract.decode.num_frames", "extract.decode.frame_size", "extract.decode.audio_sample_rate",
                    "extract.decode.max_audio_seconds", "extract.decode.audio_backend", "extract.decode.sampling",
                    "extract.decode.keyframe_tolerance", "extract.face.detector", "extract.face.cascade",
                    "extract.face.crop_size", "extract.face.margin", "extract.face.min_face_frac",
                    "extract.face.detect_min_size", "extract.face.scale_factor", "extract.face.min_neighbors",
                    "extract.encoders.max_text_tokens")

VECTOR = pa.list_(pa.float32())
SEQUENCE = pa.list_(pa.list_(pa.float32()))

BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("clip_id", pa.string()), ("split", pa.string()), ("label", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("decode_status", pa.string()), ("decode_backend", pa.string()),
]
TAIL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("transcript", pa.string()), ("transcript_enriched", pa.string()), ("enrich_status", pa.string()),
    ("n_face_frames", pa.int32()), ("config_hash", pa.string()), ("model_ids", pa.string()),
]


def vector_branches(cfg: MerConfig) -> list[str]:
    """Vector columns of the store: the four branches, plus ``text_enriched`` with ``text_source: both``."""
    out = list(BRANCHES)
    if cfg.enrich.text_source == "both" and cfg.extract.encoders.text.enabled:
        out.append("text_enriched")
    return out


def feature_schema(cfg: MerConfig) -> pa.Schema:
    """The Arrow schema every part of a store written with ``cfg`` has."""
    fields = list(BASE_FIELDS)
    for b in vector_branches(cfg):
        fields += [(b, VECTOR), (f"{b}_status", pa.string())]
        stage = getattr(cfg.extract.encoders, "text" if b == "text_enriched" else b)
        if stage.keep_sequence:
            fields.append((f"{b}_seq", SEQUENCE))
    fields += TAIL_FIELDS
    return pa.schema(fields)


def vector_branches_from_schema(schema: pa.Schema) -> list[str]:
    """The pooled-vector columns of a store schema."""
    return [f.name for f in schema if f.type.equals(VECTOR)]


def config_hash(cfg: MerConfig) -> str:
    """Hash of what determines the features: decode/face settings, the model profile, enrichment."""
    sections = [*FEATURE_SECTIONS, f"profiles.{cfg.profile}"]
    if cfg.enrich.enabled:
        sections += ["enrich.text_source", "enrich.compose", "enrich.max_tokens", "enrich.prompt_language",
                     "enrich.temperature", "enrich.seed"]
    return cfg.section_hash(*sections)


def model_ids_json(cfg: MerConfig) -> str:
    ids = {b: getattr(cfg.models, b).model_id for b in BRANCHES}
    if cfg.enrich.enabled:
        ids["llm"] = cfg.models.llm.model_id
    return json.dumps(ids, sort_keys=True)


def part_files(uri: str) -> list[str]:
    """The committed parts of a store (sorted: commit order within a run)."""
    return [p for p in storage.list_files(uri, ".parquet") if p.rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def stored_ids(uri: str) -> set[str]:
    """``clip_id``s already committed to the store (empty for a new store)."""
    ids: set[str] = set()
    for p in part_files(uri):
        ids.update(storage.read_table(p, columns=["clip_id"]).column("clip_id").to_pylist())
    return ids


def read_meta(uri: str) -> dict[str, Any] | None:
    path = storage.join(uri, META_FILE)
    return storage.read_json(path) if storage.exists(path) else None


def ensure_meta(cfg: MerConfig, uri: str, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Write ``_meta.json`` for a new store; refuse to mix features of another config into an old one."""
    meta = {"schema_version": SCHEMA_VERSION, "config_hash": config_hash(cfg), "model_ids": json.loads(
        model_ids_json(cfg)), "profile": cfg.profile, "vector_columns": vector_branches(cfg),
        "schema": [f"{f.name}: {f.type}" for f in feature_schema(cfg)]}
    old = read_meta(uri)
    if old is not None and old.get("config_hash") != meta["config_hash"] and part_files(uri):
        if not allow_config_change:
            raise ValueError(
                f"feature store {uri} was written with config hash {old.get('config_hash')} but this config "
                f"hashes to {meta['config_hash']} (decode/face/model settings changed): use a new output "
                f"directory, or allow_config_change=True to mix them")
    if old is None or old.get("config_hash") != meta["config_hash"]:
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        storage.write_json(storage.join(uri, META_FILE), meta)
    return meta


class PartWriter:
    """Driver-side buffer that commits full parts of ``rows_per_part`` rows atomically.

    ``add`` drops rows whose clip_id is already stored or already seen in this run, which is what makes
    a retried Ray task or a resumed run unable to produce a duplicate row.
    """

    def __init__(self, uri: str, schema: pa.Schema, rows_per_part: int, already: set[str] | None = None):
        self.uri, self.schema, self.rows_per_part = uri, schema, rows_per_part
        self.seen: set[str] = set(already or ())
        self.run = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.rows_written = 0
        self.duplicates_dropped = 0

    def add(self, table: pa.Table) -> None:
        ids = table.column("clip_id").to_pylist()
        keep = []
        for i, cid in enumerate(ids):
            if cid in self.seen:
                self.duplicates_dropped += 1
            else:
                self.seen.add(cid)
                keep.append(i)
        if len(keep) != len(ids):
            table = table.take(pa.array(keep, pa.int64()))
        if table.num_rows == 0:
            return
        self.buffer.append(table.select(self.schema.names).cast(self.schema))
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_part:
            self._commit(self.rows_per_part)

    def _commit(self, n: int) -> None:
        data = pa.concat_tables(self.buffer)
        part, rest = data.slice(0, n), data.slice(n)
        uri = storage.join(self.uri, f"{PART_PREFIX}{self.run}-{len(self.parts):05d}.parquet")
        storage.write_table(uri, part)
        self.parts.append(uri)
        self.rows_written += part.num_rows
        self.buffer = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def flush(self) -> None:
        """Commit whatever is buffered (the last, possibly short, part)."""
        if self.buffered:
            self._commit(self.buffered)


def read_features(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a store, one per clip_id (first committed part wins if a clip was ever written twice).

    ``columns`` narrows the read; ``clip_id`` is always kept, first.
    """
    parts = part_files(uri)
    if not parts:
        raise FileNotFoundError(f"no feature parts under {uri}")
    cols = None if columns is None else list(dict.fromkeys(["clip_id", *columns]))
    table = pa.concat_tables([storage.read_table(p, columns=cols) for p in parts], promote_options="default")
    ids = table.column("clip_id").to_pylist()
    first: dict[str, int] = {}
    for i, cid in enumerate(ids):
        first.setdefault(cid, i)
    if len(first) != len(ids):
        table = table.take(pa.array(sorted(first.values()), pa.int64()))
    return table if cols is None else table.select(cols)


def check_store(uri: str, cfg: MerConfig | None = None, manifest_ids: list[str] | None = None) -> dict[str, Any]:
    """Schema and exactly-once check: per-part schema problems, duplicate and missing/extra clip ids."""
    problems: list[str] = []
    ids: list[str] = []
    expected = feature_schema(cfg) if cfg is not None else None
    for p in part_files(uri):
        t = storage.read_table(p)
        ids += t.column("clip_id").to_pylist()
        if expected is not None:
            for f in expected:
                if f.name not in t.schema.names:
                    problems.append(f"{p}: missing column {f.name}")
                elif not t.schema.field(f.name).type.equals(f.type):
                    problems.append(f"{p}: column {f.name} is {t.schema.field(f.name).type}, expected {f.type}")
    counts = Counter(ids)
    dups = sorted(k for k, v in counts.items() if v > 1)
    out: dict[str, Any] = {"rows": len(ids), "unique": len(counts), "duplicates": dups, "problems": problems}
    if manifest_ids is not None:
        want = set(manifest_ids)
        out["missing"] = sorted(want - set(counts))
        out["extra"] = sorted(set(counts) - want)
    meta = read_meta(uri)
    if meta is None:
        problems.append(f"{uri}: no {META_FILE}")
    elif cfg is not None and meta.get("config_hash") != config_hash(cfg):
        problems.append(f"{uri}: config hash {meta.get('config_hash')} != {config_hash(cfg)}")
    out["ok"] = not problems and not dups and not out.get("missing") and not out.get("extra")
    return out


def status_counts(table: pa.Table, columns: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Counts by value of ``status`` and each ``*_status`` column."""
    cols = columns or [c for c in table.column_names if c == "status" or c.endswith("_status")]
    out: dict[str, dict[str, int]] = {}
    for c in cols:
        if c in table.column_names:
            vc = pc.value_counts(table.column(c).fill_null("null")).to_pylist()
            out[c] = {str(d["values"]): int(d["counts"]) for d in vc}
    return out
