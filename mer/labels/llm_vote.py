"""The LLM vote: the enrichment engine asked for one of the six labels — a label source independent of the
trained models.

Each clip's transcript (its subtitle, or what the speech stage heard: ``--features``), plus its enriched
description and the vision-language model's description of its keyframes when there are any, goes through the
same enrichment stage
(:mod:`mer.enrich.stage`: vLLM through ``ray.data.llm`` or the transformers backend, the same model, resources,
guard rails and Parquet cache) with the vote template (``vote_<lang>.txt``: answer with one label only),
greedy decoding and a few tokens. The answer is parsed strictly (:func:`parse_vote`): anything that is not
exactly one label is no vote. Output, one row per manifest clip:

``clip_id, label`` (null = no vote) ``, vote_status, answer, model_id, prompt_hash`` with ``vote_status`` one of
``ok``, ``unparsed`` (the answer is not one label), ``empty_text`` (no subtitle: not asked), ``empty_output``,
``error`` (generation failed; the message is in ``answer``). ``answer`` holds the model's cleaned answer for
``ok``/``unparsed`` rows.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from mer.config import LABELS, MerConfig, with_overrides
from mer.data.manifest import read_manifest
from mer.enrich import guard
from mer.enrich.cache import EnrichCache, default_cache_dir
from mer.enrich.stage import enrich_table
from mer.store import storage
from mer.store.parts import read_parts

VOTE_COLUMNS = ("clip_id", "label", "vote_status", "answer", "model_id", "prompt_hash")
DESCRIPTION_COLUMN = "description"
# The voice-free visual evidence: the feature store's `visual_description_text` (extract.describe).
VISUAL_COLUMN = "visual_description"
# Chinese names a model may answer with despite the instruction; anything else is no vote.
CHINESE_LABELS = {
    "中性": "neutral", "平静": "neutral", "生气": "angry", "愤怒": "angry", "高兴": "happy", "开心": "happy",
    "快乐": "happy", "悲伤": "sad", "伤心": "sad", "难过": "sad", "担心": "worried", "担忧": "worried",
    "焦虑": "worried", "惊讶": "surprise", "吃惊": "surprise",
}
_EDGE = re.compile(r"^[\s\"'`“”‘’「」『』《》«»()\[\]（）【】<>*_.,;:!?。，；：！？、-]+|"
                   r"[\s\"'`“”‘’「」『』《》«»()\[\]（）【】<>*_.,;:!?。，；：！？、-]+$")


def parse_vote(answer: str | None) -> str | None:
    """The label an answer names, or None: after trimming quotes, brackets and punctuation at both ends the
    answer must be exactly one label (any case; ``surprised`` and the Chinese names are accepted)."""
    if not answer:
        return None
    text = _EDGE.sub("", guard.normalize_text(answer)).strip().lower()
    if text in LABELS:
        return text
    if text == "surprised":
        return "surprise"
    return CHINESE_LABELS.get(text)


def vote_config(cfg: MerConfig) -> MerConfig:
    """The enrichment config turned into a voter: vote template, greedy, short answers, no composition."""
    lc = cfg.labels
    template = lc.llm_vote_prompt_file or str(Path(__file__).resolve().parent.parent / "enrich" / "prompts"
                                              / f"vote_{cfg.enrich.prompt_language}.txt")
    return with_overrides(cfg, [f"enrich.prompt_file={template}", "enrich.temperature=0",
                                f"enrich.max_tokens={lc.llm_vote_max_tokens}", "enrich.compose=replace",
                                f"enrich.context_columns=[{DESCRIPTION_COLUMN},{VISUAL_COLUMN}]"])


def enriched_descriptions(enriched: pa.Table) -> dict[str, str]:
    """clip_id → the LLM description alone, from ``mer enrich`` output (``text_enriched`` is the subtitle plus
    the description in append mode); clips whose enrichment produced nothing get none."""
    ids = enriched.column("clip_id").to_pylist()
    texts = enriched.column("text").to_pylist() if "text" in enriched.column_names else [None] * len(ids)
    statuses = (enriched.column("enrich_status").to_pylist() if "enrich_status" in enriched.column_names
                else ["ok"] * len(ids))
    out: dict[str, str] = {}
    for cid, text, rich, status in zip(ids, texts, enriched.column("text_enriched").to_pylist(), statuses):
        if status not in (guard.OK, guard.TRUNCATED) or not rich:
            continue
        text = text or ""
        desc = rich[len(text):].lstrip("\n") if text and rich.startswith(text) else rich
        if desc.strip() and desc != text:
            out[cid] = desc
    return out


def store_clips(features_uri: str) -> pa.Table:
    """``clip_id, text, description, visual_description`` of a feature store's rows: the transcript it was
    extracted with (subtitle or speech recognition), the enrichment's description and the visual description."""
    t = read_parts(features_uri, columns=["clip_id", "transcript", "transcript_enriched", "enrich_status",
                                          "visual_description_text"])
    desc = enriched_descriptions(pa.table({"clip_id": t["clip_id"], "text": t["transcript"],
                                           "text_enriched": t["transcript_enriched"],
                                           "enrich_status": t["enrich_status"]}))
    ids = t["clip_id"].to_pylist()
    return pa.table({"clip_id": t["clip_id"], "text": t["transcript"],
                     DESCRIPTION_COLUMN: pa.array([desc.get(c) for c in ids], pa.string()),
                     VISUAL_COLUMN: t["visual_description_text"]})


def vote_table(cfg: MerConfig, clips: pa.Table, cache_dir: str | None = None,
               stats: dict[str, Any] | None = None) -> pa.Table:
    """Ask the LLM for a label for every row of ``clips`` (``clip_id, text[, description][, visual_description]``)."""
    vcfg = vote_config(cfg)
    keep = ["clip_id", "text"] + [c for c in (DESCRIPTION_COLUMN, VISUAL_COLUMN) if c in clips.column_names]
    table = clips.select(keep).cast(pa.schema([(c, pa.string()) for c in keep]))
    st: dict[str, Any] = {}
    out = enrich_table(vcfg, table, cache_dir=cache_dir, stats=st)
    labels, status, answers = [], [], []
    for s, rich, note in zip(out.column("enrich_status").to_pylist(), out.column("text_enriched").to_pylist(),
                             out.column("enrich_note").to_pylist()):
        if s in (guard.OK, guard.TRUNCATED):
            lab = parse_vote(rich)
            labels.append(lab)
            status.append("ok" if lab else "unparsed")
            answers.append(rich)
        else:
            labels.append(None)
            status.append(s)
            # Only a failure's message is worth keeping (failures are never cached, so re-runs agree).
            answers.append(note or None if s == guard.ERROR else None)
    n = out.num_rows
    result = pa.table({"clip_id": out.column("clip_id"), "label": pa.array(labels, pa.string()),
                       "vote_status": pa.array(status, pa.string()), "answer": pa.array(answers, pa.string()),
                       "model_id": pa.array([st.get("model_id", cfg.models.llm.model_id)] * n, pa.string()),
                       "prompt_hash": pa.array([st.get("prompt_hash", "")] * n, pa.string())})
    if stats is not None:
        stats.update({"generated": st.get("engine", 0), "reused_or_skipped": st.get("not_engine", 0),
                      "status_counts": dict(Counter(status)), "model_id": st.get("model_id"),
                      "prompt_hash": st.get("prompt_hash")})
    return result


def llm_vote(cfg: MerConfig, manifest_uri: str | None, out_uri: str, *, enriched_uri: str | None = None,
             cache_dir: str | None = None, features_uri: str | None = None) -> dict[str, Any]:
    """``mer llm-vote``: one vote row per clip of the manifest, or of the feature store ``features_uri`` (its
    transcripts, enriched and visual descriptions), into ``out_uri`` (Parquet); resumable through the
    enrichment cache (a re-run only asks for clips it has not seen). Returns a summary."""
    t0 = time.time()
    if features_uri:
        clips = store_clips(features_uri)
    else:
        if not manifest_uri:
            raise ValueError("llm-vote needs a manifest or a feature store")
        manifest = read_manifest(manifest_uri)
        if "clip_id" not in manifest.column_names:
            raise ValueError(f"{manifest_uri}: manifest has no clip_id column")
        if "text" not in manifest.column_names:
            manifest = manifest.append_column("text", pa.nulls(manifest.num_rows, pa.string()))
        clips = manifest.select(["clip_id", "text"])
    if enriched_uri:
        desc = enriched_descriptions(read_parts(enriched_uri))
        if DESCRIPTION_COLUMN in clips.column_names:  # the store's own enrichment gives way to the table named
            clips = clips.drop_columns([DESCRIPTION_COLUMN])
        clips = clips.append_column(DESCRIPTION_COLUMN, pa.array([desc.get(c) for c in
                                                                 clips.column("clip_id").to_pylist()], pa.string()))
    cache_dir = cache_dir or default_cache_dir(cfg.enrich.cache_dir, out_uri)
    stats: dict[str, Any] = {}
    votes = vote_table(cfg, clips, cache_dir=cache_dir, stats=stats)
    storage.write_table(out_uri, votes.select(list(VOTE_COLUMNS)))
    if stats.get("prompt_hash"):
        EnrichCache(cache_dir).compact(stats["model_id"], stats["prompt_hash"])
    return {"out": out_uri, "rows": votes.num_rows, "votes": sum(v is not None for v in votes.column("label").to_pylist()),
            **stats, "with_descriptions": bool(enriched_uri) or bool(features_uri), "cache_dir": cache_dir,
            "seconds": round(time.time() - t0, 2)}
