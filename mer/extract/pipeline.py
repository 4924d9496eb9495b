"""The streaming extraction pipeline: manifest → decode once → face → encoders → feature store.

::

    manifest rows (small blocks) ─► [dataset stages, e.g. enrichment] ─► decode (CPU actors, child process,
    timeout + fallback) ─► face detect/crop (CPU actors) ─► [asr: transcripts of the decoded audio]
    ─► [describe: descriptions of the decoded keyframes] ─► global_visual ─► face ─► audio ─► [extra
    map_batches stages] ─► text encoder actor pools ─► assemble (drops frames/audio/crops) ─► driver
    commits Parquet parts (exactly once)

The driver consumes the stream with ``iter_batches`` and commits parts itself (see :mod:`store`), so
large arrays never reach the driver or the store, and memory is bounded by the in-flight blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import MerConfig, Resources, describes, enabled_branches, enriches_inline, transcribes
from mer.data.manifest import read_manifest
from mer.encoders import ENCODERS
from mer.enrich.cache import default_cache_dir
from mer.enrich.describe import Describer
from mer.enrich.engine import actor_env
from mer.enrich.generators import engine_env
from mer.enrich.inline import InlineEnricher
from mer.enrich.stage import build_enrich_stage, enrich_table
from mer.enrich.transcribe import Transcriber
from mer.extract import schema as store
from mer.extract.decode import ClipDecoder
from mer.extract.face import FaceDetector
from mer.extract.stages import encoder_group_stage, encoder_stage
from mer.extract.timing import StageTimes, drop_timing, is_timing, timed
from mer.runtime.placement import llm_placement
from mer.runtime.stall import StallWatch
from mer.runtime.stream import Stage, build, write_stream
from mer.store import storage
from mer.store.parts import PartStore, read_parts

log = logging.getLogger("mer.extract")

MANIFEST_COLUMNS = ("clip_id", "video_uri", "audio_uri", "text", "label", "split")
# What the LLM stage adds to a row (mer.enrich.stage.OUTPUT_COLUMNS).
ENRICH_COLUMNS = ("text_enriched", "enrich_status", "enrich_note")
# Vector columns the text encoder writes besides ``text``.
TEXT_VECTORS = ("text_enriched", "visual_description")
# Columns that never leave the workers (large arrays).
HEAVY_COLUMNS = ("frames", "audio", "face_crops", "face_mask")
# What the text encoder reads besides the transcript, when earlier stages add it.
TEXT_OPTIONAL = ("text_enriched", "visual_description_text", "describe_status")


# ------------------------------------------------------------------------------------------ manifest
def read_manifest_table(uri: str) -> pa.Table:
    """The manifest (:func:`mer.data.manifest.read_manifest`) with the columns the stages need, as strings."""
    t = read_manifest(uri)
    if "clip_id" not in t.column_names or "video_uri" not in t.column_names:
        raise ValueError(f"{uri}: a manifest needs clip_id and video_uri columns (has {t.column_names})")
    for c in MANIFEST_COLUMNS:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    keep = [c for c in t.column_names if c in MANIFEST_COLUMNS or not pa.types.is_nested(t.schema.field(c).type)]
    t = t.select(keep)
    return t.cast(pa.schema([(f.name, pa.string()) if f.name in MANIFEST_COLUMNS else f for f in t.schema]))


# ------------------------------------------------------------------------------------------ stages
def _remote_args(cfg: MerConfig) -> dict[str, Any]:
    # Ray restarts a killed actor and re-sends its in-flight batches (the driver dedupes anyway).
    return {"max_restarts": cfg.extract.max_restarts, "max_task_retries": cfg.extract.max_task_retries}


def decode_stage(cfg: MerConfig) -> Stage:
    """The decode actor pool (``extract.decode``): video frames and audio of each clip, in a child process."""
    # The decode actors read s3:// inputs: give them the driver's S3 settings even when the Ray
    # cluster was started before they were set (the same variables init_ray forwards).
    s3_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ra = _remote_args(cfg)
    return Stage(name="decode", fn=timed(ClipDecoder, "decode"), inputs=ClipDecoder.input_columns,
                 optional_inputs=ClipDecoder.optional_inputs, outputs=ClipDecoder.output_columns, kind="actor",
                 resources=cfg.extract.decode.resources, constructor_args=(cfg,),
                 map_args={**ra, "runtime_env": {"env_vars": s3_env}} if s3_env else ra)


def face_stage(cfg: MerConfig) -> Stage:
    """The face detection actor pool (``extract.face``): face crops of the decoded frames."""
    return Stage(name="face_detect", fn=timed(FaceDetector, "face_detect"), inputs=FaceDetector.input_columns,
                 outputs=FaceDetector.output_columns, kind="actor", resources=cfg.extract.face.resources,
                 constructor_args=(cfg,), map_args=_remote_args(cfg))


def branch_stage(cfg: MerConfig, branch: str) -> Stage:
    """The encoder actor pool of one branch (``extract.encoders.<branch>``); the text encoder also reads the
    enriched transcript and the visual description when earlier stages add them."""
    return encoder_stage(branch, ENCODERS[branch], cfg, getattr(cfg.extract.encoders, branch).resources,
                         _remote_args(cfg), optional=TEXT_OPTIONAL if branch == "text" else ())


def transcribe_stage(cfg: MerConfig, cache_dir: str | None = None) -> Stage:
    """The speech-recognition actor pool (``extract.asr``): transcripts of the decoded audio; its actors own
    their engine (:mod:`mer.enrich.engine` says why not ``ray.data.llm``)."""
    a = cfg.extract.asr
    return Stage(name="asr", fn=timed(Transcriber, "asr"), inputs=Transcriber.input_columns,
                 optional_inputs=Transcriber.optional_inputs, outputs=Transcriber.output_columns, kind="actor",
                 resources=a.resources, constructor_args=(cfg, cache_dir),
                 map_args={**_remote_args(cfg), "runtime_env": {"env_vars": actor_env(a)}})


def describe_stage(cfg: MerConfig, cache_dir: str | None = None) -> Stage:
    """The visual-description actor pool (``extract.describe``): descriptions of the decoded keyframes."""
    d = cfg.extract.describe
    return Stage(name="describe", fn=timed(Describer, "describe"), inputs=Describer.input_columns,
                 outputs=Describer.output_columns, kind="actor", resources=d.resources,
                 constructor_args=(cfg, cache_dir),
                 map_args={**_remote_args(cfg), "runtime_env": {"env_vars": actor_env(d)}})


def inline_enrich_stage(cfg: MerConfig, cache_dir: str | None = None) -> Stage:
    """The LLM enrichment as an actor pool after the speech stage (:mod:`mer.enrich.inline`), just before the
    text encoder: ``enrich.resources`` actors, each owning its engine."""
    e = cfg.enrich
    env = engine_env(cfg) if e.backend == "vllm" else {}
    return Stage(name="enrich", fn=timed(InlineEnricher, "enrich"), inputs=InlineEnricher.input_columns,
                 optional_inputs=tuple(e.context_columns), outputs=InlineEnricher.output_columns, kind="actor",
                 resources=e.resources, constructor_args=(cfg, cache_dir),
                 map_args={**_remote_args(cfg), "runtime_env": {"env_vars": env}})


def media_cache_dirs(cfg: MerConfig, out_uri: str) -> dict[str, str]:
    """Where the store's transcripts and descriptions are cached (the stages' ``cache_dir``, else beside the
    store): ``{"asr": …, "describe": …}`` for the stages that run."""
    out = {}
    if transcribes(cfg):
        out["asr"] = default_cache_dir(cfg.extract.asr.cache_dir, out_uri, "asr_cache")
    if describes(cfg):
        out["describe"] = default_cache_dir(cfg.extract.describe.cache_dir, out_uri, "describe_cache")
    return out


def build_stages(cfg: MerConfig, extra_stages: list[Stage | Any] | None = None,
                 branches: list[str] | None = None, include_face: bool = True,
                 caches: dict[str, str] | None = None) -> list[Stage]:
    """The ordered stage list for ``cfg``.

    With ``text.source`` asr/auto the speech stage, with ``extract.describe`` the description stage run after
    face detection (``caches``: their cache directories, :func:`media_cache_dirs`; none: nothing cached).

    ``extra_stages`` is the hook for extra steps such as LLM enrichment: a :class:`Stage` of kind
    ``actor``/``task`` is inserted just before the text encoder (it sees every column but the heavy
    arrays are still there, so keep it light); a :class:`Stage` of kind ``dataset`` or any plain
    ``Dataset -> Dataset`` callable (e.g. ``mer.enrich.stage.EnrichStage``, which materialises its rows)
    runs on the manifest rows before decoding. Both must leave every input row in place.
    """
    ra = _remote_args(cfg)
    before_decode: list[Stage] = []
    before_text: list[Stage] = []
    for s in extra_stages or []:
        if not isinstance(s, Stage):
            outs = tuple(getattr(s, "output_columns", None) or getattr(s, "OUTPUT_COLUMNS", ()) or
                         ("text_enriched", "enrich_status", "enrich_note"))
            s = Stage(name=type(s).__name__, fn=s, inputs=("clip_id",), outputs=outs, kind="dataset")
        (before_decode if s.kind == "dataset" else before_text).append(s)

    stages: list[Stage] = [*before_decode, decode_stage(cfg)]
    wanted = branches if branches is not None else enabled_branches(cfg)
    if include_face and "face" in wanted:
        stages.append(face_stage(cfg))
    caches = caches or {}
    if transcribes(cfg):
        stages.append(transcribe_stage(cfg, caches.get("asr")))
    if describes(cfg):
        stages.append(describe_stage(cfg, caches.get("describe")))
    colocated = cfg.extract.encoders.colocated
    if colocated is not None and wanted:
        # one pool for every encoder: the extra stages meant for just before the text encoder run before it
        stages += before_text
        return stages + [encoder_group_stage(list(wanted), cfg, colocated, ra,
                                             optional=TEXT_OPTIONAL if "text" in wanted else ())]
    for b in wanted:
        if b == "text":
            stages += before_text
            before_text = []
        stages.append(branch_stage(cfg, b))
    stages += before_text
    return stages


# ------------------------------------------------------------------------------------------ assemble
def _vec(v: Any) -> list[float] | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    return a.tolist() if a.size else None


def _seq(v: Any) -> list[list[float]] | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    a = np.asarray(v, dtype=np.float32)
    return a.reshape(a.shape[0], -1).tolist() if a.size else None


def _str(v: Any) -> str | None:
    """A string cell; None and "" (the in-flight stand-in for a missing value) become null."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return str(v) or None


def assemble_batch(batch: dict[str, np.ndarray], schema: pa.Schema, branches: list[str], config_hash: str,
                   model_ids: str) -> pa.Table:
    """Encoded rows → store rows (the schema's columns + the stages' timing columns); heavy arrays are dropped."""
    n = len(batch["clip_id"])

    def col(name: str) -> list[Any]:
        return list(batch[name]) if name in batch else [None] * n

    vector_cols = store.vector_branches_from_schema(schema)
    out: dict[str, list[Any]] = {}
    statuses: dict[str, list[str]] = {}
    active = [b for b in vector_cols if b in branches or (b in TEXT_VECTORS and "text" in branches)]
    for b in vector_cols:
        if b not in active:
            # A disabled branch's name may still be an input column (the transcript ``text``, the
            # waveform ``audio``): never read it as a vector.
            out[b], statuses[b] = [None] * n, ["disabled"] * n
            out[f"{b}_status"] = statuses[b]
            if f"{b}_seq" in schema.names:
                out[f"{b}_seq"] = [None] * n
            continue
        out[b] = [_vec(v) for v in col(b)]
        st = [_str(s) or "error" for s in col(f"{b}_status")]
        out[f"{b}_status"] = st
        statuses[b] = st
        if f"{b}_seq" in schema.names:
            out[f"{b}_seq"] = [_seq(v) for v in col(f"{b}_seq")]
    overall, errors = [], []
    err_cols = ["decode_error", "face_detect_error", "asr_error", "describe_error",
                *[f"{b}_error" for b in vector_cols], "enrich_note"]
    err_vals = {c: col(c) for c in err_cols if c in batch}
    for i in range(n):
        ok = [statuses[b][i] == "ok" for b in active]
        overall.append("ok" if ok and all(ok) else ("failed" if not any(ok) else "partial"))
        msgs = [_str(err_vals[c][i]) for c in err_vals]
        # every unavailable branch is named, even when its stage left no message (no_audio, empty_text)
        msgs += [f"{b}: {statuses[b][i]}" for b in active if statuses[b][i] != "ok"]
        errors.append("; ".join(dict.fromkeys(m for m in msgs if m)) or None)
    out["status"], out["error"] = overall, errors
    # split/label are filled in by the driver from the manifest (they never travel through the stages).
    for c in ("clip_id", "split", "label", "decode_status", "decode_backend", "enrich_status"):
        out[c] = [_str(v) for v in col(c)]

    def transcript(name: str) -> list[str | None]:
        return [v if isinstance(v, str) else None for v in col(name)]

    # The text encoder keeps the transcripts under transcript*; without it the manifest text is the one.
    out["transcript"] = transcript("transcript" if "transcript" in batch else "text")
    out["transcript_enriched"] = transcript("transcript_enriched" if "transcript_enriched" in batch
                                            else "text_enriched")
    # Text from the video itself: "disabled" where its stage did not run.
    for c in ("asr_status", "describe_status"):
        out[c] = [_str(v) or "disabled" for v in col(c)] if c in batch else ["disabled"] * n
    out["asr_language"] = [_str(v) for v in col("asr_language")]
    out["visual_description_text"] = [_str(v) for v in col("visual_description_text")]
    out["transcript_source"] = ([_str(v) for v in col("transcript_source")] if "transcript_source" in batch
                                else ["subtitle" if t else "none" for t in out["transcript"]])
    out["n_face_frames"] = [int(np.asarray(m).sum()) if isinstance(m, np.ndarray) else 0
                            for m in col("face_mask")]
    out["config_hash"] = [config_hash] * n
    out["model_ids"] = [model_ids] * n
    arrays = {f.name: pa.array(out[f.name], type=f.type) for f in schema}
    for k in batch:
        if is_timing(k):
            arrays[k] = pa.array(np.asarray(batch[k], dtype=np.float64))
    return pa.table(arrays)


# ------------------------------------------------------------------------------------------ run
def pipeline_input(cfg: MerConfig, manifest: pa.Table) -> pa.Table:
    """The manifest columns the stages need, nulls as "" (so every block has the same string type);
    split/label stay on the driver."""
    import pyarrow.compute as pc

    cols = ["clip_id", "video_uri", "audio_uri", "text"]
    if cfg.enrich.enabled:
        cols += [c for c in cfg.enrich.context_columns if c in manifest.column_names and c not in cols]
        # enriched before the stream (enrich.placement: before): the results travel with the rows
        cols += [c for c in ENRICH_COLUMNS if c in manifest.column_names]
    return pa.table({c: pc.fill_null(manifest.column(c).cast(pa.string()), "") for c in cols})


def add_manifest_columns(table: pa.Table, lookup: dict[str, tuple[str | None, str | None]]) -> pa.Table:
    """Fill ``split``/``label`` of store rows from the manifest (driver side)."""
    ids = table.column("clip_id").to_pylist()
    for j, name in ((0, "split"), (1, "label")):
        vals = pa.array([lookup.get(c, (None, None))[j] for c in ids], pa.string())
        table = table.set_column(table.column_names.index(name), name, vals)
    return table


def build_dataset(cfg: MerConfig, manifest: pa.Table, stages: list[Stage]) -> Any:
    """Ray Dataset of store rows for ``manifest`` (lazy): small input blocks → stages → assemble."""
    import ray

    rows = cfg.extract.input_block_rows or cfg.extract.decode.resources.batch_size
    manifest = pipeline_input(cfg, manifest)
    blocks = [manifest.slice(i, rows) for i in range(0, manifest.num_rows, rows)] or [manifest]
    kwargs = dict(schema=store.feature_schema(cfg), branches=enabled_branches(cfg),
                  config_hash=store.config_hash(cfg), model_ids=store.model_ids_json(cfg))
    last = stages[-1] if stages else None
    if last is not None and last.kind == "actor" and isinstance(last.fn, type):
        # The last actor pool assembles its own output: a separate task would wait for a task worker process
        # to start (seconds on a small machine, measured 4 s of a 17 s run's time to the first row).
        last = dataclasses.replace(last, fn=assembling(last.fn), constructor_args=(*last.constructor_args, kwargs))
        return build(ray.data.from_arrow(blocks), [*stages[:-1], last], manifest.column_names)
    assemble = Stage(name="assemble", fn=assemble_batch, kind="task", fn_kwargs=kwargs,
                     map_args=dict(batch_size=cfg.extract.decode.resources.batch_size, num_cpus=0.0,
                                   zero_copy_batch=True))
    return build(ray.data.from_arrow(blocks), [*stages, assemble], manifest.column_names)


def assembling(cls: type) -> type:
    """A subclass of a stage's ``map_batches`` callable class whose output batches are store rows
    (:func:`assemble_batch`; its keyword arguments come as the constructor's last positional argument). It keeps
    the class name, so Ray's actor names still say which stage it is."""

    def __init__(self: Any, *args: Any) -> None:
        cls.__init__(self, *args[:-1])
        self._assemble_kwargs = args[-1]

    def __call__(self: Any, batch: dict[str, np.ndarray]) -> pa.Table:
        return assemble_batch(cls.__call__(self, batch), **self._assemble_kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def enrich_cache_dir(cfg: MerConfig, out_uri: str) -> str | None:
    """Where the store's enrichment is cached (``enrich.cache_dir``, else beside the store); None when off."""
    return default_cache_dir(cfg.enrich.cache_dir, out_uri) if cfg.enrich.enabled else None


def default_extra_stages(cfg: MerConfig, out_uri: str) -> list[Any]:
    """The enrichment stage when ``enrich.enabled`` (its cache lives next to the store by default): the inline one
    after the speech stage when the transcripts come from it."""
    if not cfg.enrich.enabled:
        return []
    if enriches_inline(cfg):
        return [inline_enrich_stage(cfg, enrich_cache_dir(cfg, out_uri))]
    return [build_enrich_stage(cfg, cache_dir=enrich_cache_dir(cfg, out_uri))]


def enrich_first(cfg: MerConfig, todo: pa.Table, cache_dir: str | None) -> pa.Table:
    """``todo`` with the LLM stage's columns, generated by the LLM stage run alone, as its own stream
    (``enrich.placement: before``): the extraction stream that follows starts no engine."""
    cols = ["clip_id", "text", *[c for c in cfg.enrich.context_columns if c in todo.column_names and c != "text"]]
    text = todo.select(cols)
    text = text.cast(pa.schema([(c, pa.string()) for c in cols]))
    log.info("enrich: the LLM stage runs before the extraction stream (enrich.placement=before)")
    enriched = enrich_table(cfg, text, cache_dir=cache_dir)
    for c in ENRICH_COLUMNS:
        todo = todo.drop_columns([c]) if c in todo.column_names else todo
        todo = todo.append_column(c, enriched.column(c).cast(pa.string()))
    return todo


def extract_features(cfg: MerConfig, manifest_uri: str, out_uri: str, *, limit: int | None = None,
                     extra_stages: list[Stage | Any] | None = None, allow_config_change: bool = False,
                     verbose: bool = True, splits: list[str] | None = None,
                     enrich_cache: str | None = None) -> dict[str, Any]:
    """Extract features of every manifest clip not yet in ``out_uri`` (local dir or ``s3://``).

    Resumable and exactly-once: clip_ids already committed are skipped, parts are committed atomically
    by the driver, duplicates are dropped. ``splits`` keeps the manifest rows of those splits, ``limit`` then
    the first N. ``extra_stages`` (default: the enrichment stage when ``enrich.enabled``, run inside the stream
    or before it as :func:`mer.runtime.placement.llm_placement` says; its cache ``enrich_cache``, else ``enrich.cache_dir``,
    else beside the store) see :func:`build_stages`. Returns (and prints) a summary: counts by status,
    clips/s, per-stage busy time.
    """
    t0 = time.time()
    storage.configure(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    manifest = read_manifest_table(manifest_uri)
    if splits is not None:
        manifest = manifest.filter(pa.array([s in splits for s in manifest.column("split").to_pylist()],
                                            pa.bool_()))
    if limit is not None:
        manifest = manifest.slice(0, limit)
    ids = manifest.column("clip_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise ValueError(f"{manifest_uri}: duplicate clip_ids in the manifest, e.g. {dup}")
    cache_dir = (enrich_cache or enrich_cache_dir(cfg, out_uri)) if cfg.enrich.enabled else None
    # Opened once before the stream: the meta check and the resume read share its listing.
    out = PartStore(out_uri)
    meta = store.ensure_meta(cfg, out, allow_config_change=allow_config_change,
                             enrich_cache=cache_dir if extra_stages is None else None,
                             media_caches=media_cache_dirs(cfg, out_uri))
    lookup = dict(zip(ids, zip(manifest.column("split").to_pylist(), manifest.column("label").to_pylist())))
    times = StageTimes(time.time())
    concurrency: dict[str, int] = {}
    run_counts: Counter = Counter()

    def stream(pending: list[str]) -> Any:
        pend = set(pending)
        todo = manifest.filter(pa.array([cid in pend for cid in ids]))
        extras = extra_stages
        if extras is None and enriches_inline(cfg):
            extras = [inline_enrich_stage(cfg, cache_dir)]
        elif extras is None and cfg.enrich.enabled and llm_placement(cfg) == "before":
            todo, extras = enrich_first(cfg, todo, cache_dir), []
        elif extras is None:
            extras = [build_enrich_stage(cfg, cache_dir=cache_dir)] if cfg.enrich.enabled else []
        stages = build_stages(cfg, extras, caches=media_cache_dirs(cfg, out_uri))
        concurrency.update({s.name: (s.resources or Resources()).concurrency for s in stages if s.kind == "actor"})
        log.info("extract: %d clips (%d already stored) → %s", todo.num_rows, len(ids) - todo.num_rows, out_uri)
        ds = build_dataset(cfg, todo, stages)
        times.t0 = time.time()  # the stream executes from here (first-row time excludes reading the store)
        return ds

    def on_batch(batch: pa.Table) -> pa.Table:
        times.add(batch)
        run_counts.update(batch.column("status").to_pylist())
        return add_manifest_columns(drop_timing(batch), lookup)

    run = write_stream(out, store.feature_schema(cfg), cfg.extract.rows_per_part, ids, stream, on_batch,
                       label="extract", restarts=cfg.extract.stream_restarts,
                       watch=StallWatch.from_config(cfg, f"the extraction stream into {out_uri}"))
    writer = run.writer
    stats_text = ""
    if run.dataset is not None:
        try:
            stats_text = run.dataset.stats()
        except Exception:  # noqa: BLE001 - stats are informational
            stats_text = ""
    seconds = time.time() - t0
    summary: dict[str, Any] = {
        "out": out_uri, "manifest_rows": manifest.num_rows, "already_stored": run.already,
        "processed": writer.rows_written, "parts_written": len(writer.parts),
        "duplicates_dropped": writer.duplicates_dropped, "seconds": round(seconds, 2),
        "clips_per_s": round(writer.rows_written / seconds, 3) if writer.rows_written else 0.0,
        "run_status_counts": dict(run_counts), "config_hash": meta["config_hash"], "stream_restarts": run.restarts,
    }
    st = times.summary(concurrency)
    summary["first_row_s"] = st["first_row"]["seconds"] if st["first_row"] else None
    summary["stage_busy_s"] = {k: round(v["busy_s"], 3) for k, v in times.stages.items()}
    summary["stage_ms_per_clip"] = {k: v["busy_ms_per_row"] for k, v in st["stages"].items()}
    summary["stage_busy_fraction"] = {k: v["busy_fraction"] for k, v in st["stages"].items()}
    # tokens the generation stages (asr, describe) generated in this run: 0 when every row came from the cache
    summary["stage_tokens"] = {k: v["tokens"] for k, v in st["stages"].items() if k in ("asr", "describe", "enrich")}
    try:  # the store as the stream left it: listed anew
        summary["status_counts"] = store.status_counts(read_parts(
            out_uri, columns=["status", *[f"{b}_status" for b in store.vector_branches(cfg)], "decode_status",
                              "asr_status", "describe_status"]))
    except FileNotFoundError:
        summary["status_counts"] = {}
    if verbose:
        if stats_text:
            log.debug("ray data stats:\n%s", stats_text)
        print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    lines = [f"extract → {summary['out']}: {summary['processed']} clips in {summary['seconds']} s "
             f"({summary['clips_per_s']} clips/s), {summary['already_stored']} already stored, "
             f"{summary['parts_written']} parts, first row after {summary.get('first_row_s')} s"]
    if summary["stage_ms_per_clip"]:
        lines.append("  busy ms/clip: " + ", ".join(f"{k}={v}" for k, v in summary["stage_ms_per_clip"].items()))
        lines.append("  busy fraction: " + ", ".join(f"{k}={v}" for k, v in summary["stage_busy_fraction"].items()))
    if summary.get("stage_tokens"):
        lines.append("  generated tokens: " + ", ".join(f"{k}={v}" for k, v in summary["stage_tokens"].items()))
    for col, counts in summary.get("status_counts", {}).items():
        lines.append(f"  {col}: " + json.dumps(counts, sort_keys=True))
    return "\n".join(lines)
