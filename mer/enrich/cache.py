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


def default_cache_dir(cfg_cache_dir: str | None, near_uri: str, name: str = "enrich_cache") -> str:
    """``cfg_cache_dir`` if set, else ``name`` beside ``near_uri`` (an output file or dir)."""
    if cfg_cache_dir:
        return cfg_cache_dir
    base = str(near_uri).rstrip("/")
    parent = base.rsplit("/", 1)[0] if "/" in base else "."
    return storage.join(parent, name)


TEXT_CACHE_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("model_id", pa.string()), ("settings_hash", pa.string()), ("input_sha", pa.string()),
    ("text", pa.string()), ("language", pa.string()), ("status", pa.string()), ("num_tokens", pa.int64()),
    ("created_at", pa.float64()),
])


class GeneratedTextCache:
    """Text generated from a clip's media (a transcript of its audio, a description of its keyframes), keyed by
    the hash of that media: ``<uri>/<model-key>-<settings_hash>/part-*.parquet``, a part store like
    :class:`EnrichCache`'s. The same audio or frames give the same text whatever the clip is called, so lookups
    go by ``input_sha``; ``clip_id`` is kept for people reading the cache. Each stage actor writes one part per
    batch it generated, so an interrupted run keeps what it finished."""

    def __init__(self, uri: str, model_id: str, settings_hash: str) -> None:
        self.uri, self.model_id, self.settings_hash = str(uri), model_id, settings_hash
        model_key = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:12]
        self.dir = storage.join(self.uri, f"{model_key}-{settings_hash}")

    def lookup(self) -> dict[str, tuple[str, str | None, str]]:
        """input_sha → (text, language, status); the newest row wins."""
        if not part_files(self.dir):
            return {}
        t = read_parts(self.dir, columns=TEXT_CACHE_SCHEMA.names, key=None).select(TEXT_CACHE_SCHEMA.names)
        t = t.cast(TEXT_CACHE_SCHEMA).sort_by("created_at")
        return {sha: (text or "", lang, status) for sha, text, lang, status in zip(
            t["input_sha"].to_pylist(), t["text"].to_pylist(), t["language"].to_pylist(), t["status"].to_pylist())}

    def write(self, rows: list[dict]) -> str | None:
        """One atomic part of ``rows`` (dicts with clip_id, input_sha, text, language, status, num_tokens)."""
        if not rows:
            return None
        now = time.time()
        table = pa.table({
            "clip_id": [r["clip_id"] for r in rows], "model_id": [self.model_id] * len(rows),
            "settings_hash": [self.settings_hash] * len(rows), "input_sha": [r["input_sha"] for r in rows],
            "text": [r["text"] for r in rows], "language": [r.get("language") for r in rows],
            "status": [r["status"] for r in rows], "num_tokens": [int(r.get("num_tokens") or 0) for r in rows],
            "created_at": [now] * len(rows)}, schema=TEXT_CACHE_SCHEMA)
        return write_part(self.dir, table)
