"""Enrichment cache: results keyed by (clip_id, model_id, prompt_hash) in Parquet parts.

Layout: ``<cache_dir>/<model-key>-<prompt_hash>/part-*.parquet`` (local or ``s3://``): a part store
(:mod:`mer.store.parts`), each part committed atomically by the stage as batches finish, so an interrupted run keeps
what it generated and a re-run sends only the missing clips to the engine. A cached row is reused only while the
``input_sha`` of its subtitle (+ context) still matches. Duplicate rows (task retries) are harmless:
lookups keep the newest.
"""

from __future__ import annotations

import hashlib
import time

import pyarrow as pa
import pyarrow.compute as pc

from mer.store import storage
from mer.store.parts import part_files, read_parts, write_part

CACHE_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("model_id", pa.string()), ("prompt_hash", pa.string()),
    ("input_sha", pa.string()), ("description", pa.string()), ("status", pa.string()),
    ("num_tokens", pa.int64()), ("created_at", pa.float64()),
])


class EnrichCache:
    """Parquet-part cache of enrichments under one directory (local path or ``s3://`` URI)."""

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)

    def dir_for(self, model_id: str, prompt_hash: str) -> str:
        """The directory holding the parts of one (model, prompt) pair."""
        model_key = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:12]
        return storage.join(self.uri, f"{model_key}-{prompt_hash}")

    def read(self, model_id: str, prompt_hash: str) -> pa.Table:
        """All cached rows of a (model, prompt) pair (empty table when none)."""
        d = self.dir_for(model_id, prompt_hash)
        if not part_files(d):
            return CACHE_SCHEMA.empty_table()
        # Every row: a clip enriched again (its subtitle changed) has a newer row, which lookup prefers.
        t = read_parts(d, columns=CACHE_SCHEMA.names, key=None).select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)
        return t.filter(pc.and_(pc.equal(t["model_id"], model_id),
                                        pc.equal(t["prompt_hash"], prompt_hash)))

    def lookup(self, model_id: str, prompt_hash: str) -> dict[str, tuple[str, str, str]]:
        """clip_id → (input_sha, description, status) for a (model, prompt) pair; newest row wins."""
        t = self.read(model_id, prompt_hash).sort_by("created_at")
        out: dict[str, tuple[str, str, str]] = {}
        for cid, sha, desc, status in zip(t["clip_id"].to_pylist(), t["input_sha"].to_pylist(),
                                          t["description"].to_pylist(), t["status"].to_pylist()):
            out[cid] = (sha, desc or "", status)
        return out

    def write_part(self, rows: dict[str, list], model_id: str, prompt_hash: str) -> str | None:
        """Write rows (clip_id, input_sha, description, status, num_tokens lists) as one atomic part."""
        n = len(rows["clip_id"])
        if n == 0:
            return None
        now = time.time()
        table = pa.table({
            "clip_id": pa.array(rows["clip_id"], pa.string()),
            "model_id": pa.array([model_id] * n, pa.string()),
            "prompt_hash": pa.array([prompt_hash] * n, pa.string()),
            "input_sha": pa.array(rows["input_sha"], pa.string()),
            "description": pa.array(rows["description"], pa.string()),
            "status": pa.array(rows["status"], pa.string()),
            "num_tokens": pa.array(rows["num_tokens"], pa.int64()),
            "created_at": pa.array([now] * n, pa.float64()),
        }, schema=CACHE_SCHEMA)
        return write_part(self.dir_for(model_id, prompt_hash), table)

    def compact(self, model_id: str, prompt_hash: str) -> int:
        """Merge the parts of a (model, prompt) pair into one (newest row per clip); returns rows kept.

        The merged part is written before the old ones are deleted, so a crash in between leaves
        duplicates (harmless), never a loss.
        """
        d = self.dir_for(model_id, prompt_hash)
        parts = part_files(d)
        if len(parts) <= 1:
            return self.read(model_id, prompt_hash).num_rows if parts else 0
        t = self.read(model_id, prompt_hash).sort_by([("created_at", "descending")])
        seen: set[str] = set()
        keep = []
        for i, cid in enumerate(t["clip_id"].to_pylist()):
            if cid not in seen:
                seen.add(cid)
                keep.append(i)
        merged = t.take(pa.array(keep, pa.int64()))
        write_part(d, merged)
        for p in parts:
            fs, path = storage.filesystem(p)
            fs.delete_file(path)
        return merged.num_rows


def default_cache_dir(cfg_cache_dir: str | None, near_uri: str) -> str:
    """``enrich.cache_dir`` if set, else ``enrich_cache`` beside ``near_uri`` (an output file or dir)."""
    if cfg_cache_dir:
        return cfg_cache_dir
    base = str(near_uri).rstrip("/")
    parent = base.rsplit("/", 1)[0] if "/" in base else "."
    return storage.join(parent, "enrich_cache")
