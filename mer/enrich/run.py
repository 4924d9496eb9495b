"""The ``mer enrich`` job: enrich the transcripts of a manifest into a Parquet table (resumable)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from mer.config import MerConfig
from mer.data.manifest import read_manifest
from mer.enrich.cache import EnrichCache, default_cache_dir
from mer.enrich.stage import enrich_table
from mer.runtime.stream import with_restarts
from mer.store import storage
from mer.store.parts import write_part

RESULT_COLUMNS = ("clip_id", "text", "text_enriched", "enrich_status", "enrich_note", "model_id", "prompt_hash")


def enrich_manifest(cfg: MerConfig, manifest_uri: str, out_uri: str, cache_dir: str | None = None,
                    limit: int | None = None) -> dict[str, Any]:
    """Enrich every clip's subtitle; write ``clip_id, text, text_enriched, enrich_status, enrich_note,
    model_id, prompt_hash`` to ``out_uri`` (a ``.parquet`` file, else ``<out_uri>/part-00000.parquet``).

    Results are cached by (clip_id, model_id, prompt_hash) under ``cache_dir`` (default
    ``enrich.cache_dir`` or ``enrich_cache`` beside the output), so a re-run, or a run resumed after a
    crash, only generates the clips it has not seen. Returns a summary dict.
    """
    t0 = time.time()
    manifest = read_manifest(manifest_uri)
    if "clip_id" not in manifest.column_names:
        raise ValueError(f"{manifest_uri}: manifest has no clip_id column")
    if limit is not None:
        manifest = manifest.slice(0, limit)
    keep = ["clip_id", "text"] + [c for c in cfg.enrich.context_columns if c in manifest.column_names]
    if "text" not in manifest.column_names:
        manifest = manifest.append_column("text", pa.nulls(manifest.num_rows, pa.string()))
    table = manifest.select(keep).cast(pa.schema([(c, pa.string()) for c in keep]))
    cache_dir = cache_dir or default_cache_dir(cfg.enrich.cache_dir, out_uri)
    stats: dict[str, Any] = {}
    # A restart regenerates only what the cache lacks: the finished batches' results are cached by the workers.
    out = with_restarts(lambda: enrich_table(cfg, table, cache_dir=cache_dir, stats=stats),
                        cfg.enrich.stream_restarts, f"enrichment of {manifest_uri}")
    n = out.num_rows
    out = out.append_column("model_id", pa.array([stats.get("model_id", cfg.models.llm.model_id)] * n, pa.string()))
    out = out.append_column("prompt_hash", pa.array([stats.get("prompt_hash", "")] * n, pa.string()))
    out = out.select(list(RESULT_COLUMNS))
    if str(out_uri).endswith(".parquet"):
        target = out_uri
        storage.write_table(target, out)
    else:  # a part store of one part (mer.store.parts reads either)
        target = write_part(out_uri, out, "part-00000.parquet")
    if stats.get("prompt_hash"):
        EnrichCache(cache_dir).compact(stats["model_id"], stats["prompt_hash"])
    summary = {
        "rows": n, "generated": stats.get("engine", 0), "reused_or_skipped": stats.get("not_engine", 0),
        "status_counts": stats.get("status_counts", {}), "backend": cfg.enrich.backend,
        "model_id": stats.get("model_id"), "prompt_hash": stats.get("prompt_hash"),
        "out": target, "cache_dir": cache_dir, "seconds": round(time.time() - t0, 2),
    }
    if not str(out_uri).endswith(".parquet"):
        storage.write_json(storage.join(out_uri, "_summary.json"), summary)
    return summary
