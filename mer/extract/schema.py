"""The feature store's contract: its Arrow schema, ``_meta.json`` (config hash, model ids) and checks.

The store is a part store (:mod:`mer.store.parts`: a directory, local or ``s3://``, of Parquet parts committed
exactly once, read one row per clip) plus ``_meta.json``. Schema: docs/architecture.md ("Feature store").
The transcripts are stored as ``transcript`` and ``transcript_enriched`` because ``text``/``text_enriched``
name the text vectors (the training contract).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mer.config import BRANCHES, ConfigError, MerConfig, describes, transcribes, with_overrides
from mer.store import storage
from mer.store.parts import META_FILE, PartStore

SCHEMA_VERSION = 1

# Config sections that determine the feature values (resources/batch sizes do not).
FEATURE_SECTIONS = ("extract.decode.num_frames", "extract.decode.frame_size", "extract.decode.audio_sample_rate",
                    "extract.decode.max_audio_seconds", "extract.decode.audio_backend", "extract.decode.sampling",
                    "extract.decode.keyframe_tolerance", "extract.face.detector", "extract.face.cascade",
                    "extract.face.crop_size", "extract.face.margin", "extract.face.min_face_frac",
                    "extract.face.detect_min_size", "extract.face.scale_factor", "extract.face.min_neighbors",
                    "extract.encoders.max_text_tokens")
# Enrichment settings that change the text features (only when enrichment is on).
ENRICH_SECTIONS = ("enrich.text_source", "enrich.compose", "enrich.max_tokens", "enrich.prompt_language",
                   "enrich.temperature", "enrich.seed")
# Where the transcript comes from and whether clips are described: always recorded (a store without them is
# reproduced without them); the stages' settings only when they run.
TEXT_SECTIONS = ("text.source", "extract.describe.enabled")
ASR_SECTIONS = ("extract.asr.language", "extract.asr.window_s", "extract.asr.max_seconds", "extract.asr.silence_rms",
                "extract.asr.max_tokens", "extract.asr.temperature", "extract.asr.top_p", "extract.asr.seed",
                "extract.asr.max_compression_ratio")
DESCRIBE_SECTIONS = ("extract.describe.frames", "extract.describe.prompt", "extract.describe.max_tokens",
                     "extract.describe.temperature", "extract.describe.top_p", "extract.describe.seed",
                     "extract.describe.max_output_chars", "extract.describe.max_compression_ratio")



class FeatureConfigMismatch(ConfigError):
    """Features extracted with one config meet another (a store being resumed, a run scoring a store)."""


VECTOR = pa.list_(pa.float32())
SEQUENCE = pa.list_(pa.list_(pa.float32()))

BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("clip_id", pa.string()), ("split", pa.string()), ("label", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("decode_status", pa.string()), ("decode_backend", pa.string()),
]
TAIL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("transcript", pa.string()), ("transcript_enriched", pa.string()), ("enrich_status", pa.string()),
    ("transcript_source", pa.string()), ("asr_status", pa.string()), ("asr_language", pa.string()),
    ("visual_description_text", pa.string()), ("describe_status", pa.string()),
    ("n_face_frames", pa.int32()), ("config_hash", pa.string()), ("model_ids", pa.string()),
]


def vector_branches(cfg: MerConfig) -> list[str]:
    """Vector columns of the store: the four branches, plus ``text_enriched`` with ``text_source: both`` and
    ``visual_description`` with ``extract.describe`` on (both encoded by the text encoder)."""
    out = list(BRANCHES)
    if cfg.enrich.text_source == "both" and cfg.extract.encoders.text.enabled:
        out.append("text_enriched")
    if describes(cfg) and cfg.extract.encoders.text.enabled:
        out.append("visual_description")
    return out


def feature_schema(cfg: MerConfig) -> pa.Schema:
    """The Arrow schema every part of a store written with ``cfg`` has."""
    fields = list(BASE_FIELDS)
    for b in vector_branches(cfg):
        fields += [(b, VECTOR), (f"{b}_status", pa.string())]
        stage = getattr(cfg.extract.encoders, b if b in BRANCHES else "text")
        if stage.keep_sequence:
            fields.append((f"{b}_seq", SEQUENCE))
    fields += TAIL_FIELDS
    return pa.schema(fields)


def vector_branches_from_schema(schema: pa.Schema) -> list[str]:
    """The pooled-vector columns of a store schema."""
    return [f.name for f in schema if f.type.equals(VECTOR)]


def model_slots(cfg: MerConfig) -> list[str]:
    """The model slots whose models make a store's features: the branches, and the LLM, the speech recogniser
    and the vision-language model where their stages run."""
    return [*BRANCHES, *(["llm"] if cfg.enrich.enabled else []), *(["asr"] if transcribes(cfg) else []),
            *(["vlm"] if describes(cfg) else [])]


def hashed_sections(cfg: MerConfig) -> list[str]:
    """The dotted config keys that determine a store's features under ``cfg``."""
    sections = [*FEATURE_SECTIONS, *TEXT_SECTIONS]
    if cfg.enrich.enabled:
        sections += list(ENRICH_SECTIONS)
    if transcribes(cfg):
        sections += list(ASR_SECTIONS)
    if describes(cfg):
        sections += list(DESCRIBE_SECTIONS)
    return sections


# Model slots added with the speech and description stages: a store that uses neither hashes without them.
STAGE_SLOTS = ("asr", "vlm")


def config_hash(cfg: MerConfig) -> str:
    """Hash of what determines the features: decode/face settings, the models used, enrichment, where the
    transcript comes from, the speech and description stages.

    A config that runs neither the speech nor the description stage hashes exactly as stores were hashed before
    those stages existed (the decode/face settings, the profile's other slots, enrichment when on), so stores
    and runs made then keep their hash: they resume, and `mer score` scores them without a config change."""
    if not transcribes(cfg) and not describes(cfg):
        dumped = cfg.model_dump(mode="json")
        picked: dict[str, Any] = {}
        for key in (*FEATURE_SECTIONS, *(ENRICH_SECTIONS if cfg.enrich.enabled else ())):
            node: Any = dumped
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        picked[f"profiles.{cfg.profile}"] = {slot: spec for slot, spec in dumped["profiles"][cfg.profile].items()
                                             if slot not in STAGE_SLOTS}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
    return cfg.section_hash(*hashed_sections(cfg), *(f"profiles.{cfg.profile}.{slot}" for slot in model_slots(cfg)))


def feature_settings(cfg: MerConfig) -> dict[str, Any]:
    """What :func:`config_hash` hashes, as flat dotted keys: the decode/face settings, ``profile`` and the
    selected profile's models (``models.<slot>.<field>``), ``enrich.enabled`` and, when on, the enrichment
    settings. Recorded in ``_meta.json`` (and through it in every run trained on the store), so a mismatch
    can name its keys and :func:`apply_feature_settings` can reproduce the extraction."""
    dumped = cfg.model_dump(mode="json")

    def get(key: str) -> Any:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        return node

    out: dict[str, Any] = {key: get(key) for key in hashed_sections(cfg)}
    out["profile"] = cfg.profile
    for slot in model_slots(cfg):
        out.update({f"models.{slot}.{k}": v for k, v in (dumped["profiles"][cfg.profile][slot] or {}).items()})
    out["enrich.enabled"] = cfg.enrich.enabled
    return out


def apply_feature_settings(cfg: MerConfig, settings: dict[str, Any]) -> MerConfig:
    """``cfg`` with the feature settings of :func:`feature_settings` (another config's) put in; resources,
    storage and everything else stay ``cfg``'s."""
    profile = settings.get("profile", cfg.profile)
    overrides = [f"{f'profiles.{profile}.' + key[len('models.'):] if key.startswith('models.') else key}="
                 f"{json.dumps(value)}" for key, value in settings.items()]
    return with_overrides(cfg, overrides)


def differing(ours: dict[str, Any], theirs: dict[str, Any], names: tuple[str, str]) -> str:
    """The feature settings two records (store metas, run records: ``{"settings": …}``) differ in, as
    ``differing keys: key (<names[0]> value, <names[1]> value), …``; without both records' settings, says so."""
    a, b = ours.get("settings"), theirs.get("settings")
    if a is None or b is None:
        return f"the {names[0] if a is None else names[1]} records no feature settings, only a hash"
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k} ({names[0]} {a[k]!r}, {names[1]} {b[k]!r})" for k in changed
             if a.get(k) is not None and b.get(k) is not None]
    # A stage one side runs and the other does not differs in every one of its settings: name the stage once
    # (with its key count), not each setting, so the line stays readable.
    for side, mine, other in ((names[0], a, b), (names[1], b, a)):
        only = [k for k in changed if mine.get(k) is not None and other.get(k) is None]
        if only:
            parts.append(f"set only in the {side}: " + ", ".join(_grouped(only, mine)))
    return "differing keys: " + ", ".join(parts)


def _grouped(keys: list[str], values: dict[str, Any]) -> list[str]:
    """``prefix.* (n keys)`` for each dotted prefix holding several of ``keys``, ``key=value`` for a lone one."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rsplit(".", 1)[0] if "." in k else k, []).append(k)
    return [f"{prefix}.* ({len(ks)} keys)" if len(ks) > 1 else f"{ks[0]}={values[ks[0]]!r}"
            for prefix, ks in groups.items()]


def model_ids_json(cfg: MerConfig) -> str:
    """The model ids of :func:`model_slots`, as JSON."""
    return json.dumps({slot: getattr(getattr(cfg.models, slot), "model_id", None) for slot in model_slots(cfg)},
                      sort_keys=True)


def read_meta(store: str | PartStore) -> dict[str, Any] | None:
    """A store's ``_meta.json`` (None without one): read once per open :class:`~mer.store.parts.PartStore`."""
    return PartStore.of(store).meta


def ensure_meta(cfg: MerConfig, uri: str | PartStore, *, allow_config_change: bool = False,
                enrich_cache: str | None = None, media_caches: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``_meta.json`` for a new store; refuse to mix features of another config into an old one.
    ``enrich_cache``: where the store's LLM enrichment is cached, ``media_caches`` its transcripts and descriptions
    (``{"asr": …, "describe": …}``): recorded, so runs trained on the store, and ``mer score`` on them, find them.
    An open store keeps the meta written as its own."""
    store = PartStore.of(uri)
    meta = {"schema_version": SCHEMA_VERSION, "config_hash": config_hash(cfg), "model_ids": json.loads(
        model_ids_json(cfg)), "profile": cfg.profile, "vector_columns": vector_branches(cfg),
        "settings": feature_settings(cfg), "schema": [f"{f.name}: {f.type}" for f in feature_schema(cfg)]}
    if enrich_cache:
        meta["enrich_cache"] = enrich_cache
    if media_caches:
        meta["media_caches"] = dict(media_caches)
    old = store.meta
    if old is not None and old.get("config_hash") != meta["config_hash"] and store.parts:
        if not allow_config_change:
            raise FeatureConfigMismatch(
                f"feature store {store.uri} was written with config hash {old.get('config_hash')} but this config "
                f"hashes to {meta['config_hash']} ({differing(old, meta, ('store', 'config'))}): use a new "
                f"output directory, or allow_config_change=True to mix them")
    # A store written before settings were recorded gets them (same hash: same settings).
    if (old is None or old.get("config_hash") != meta["config_hash"] or "settings" not in old
            or (enrich_cache and old.get("enrich_cache") != enrich_cache)
            or (media_caches and old.get("media_caches") != meta["media_caches"])):
        same = old is not None and old.get("config_hash") == meta["config_hash"]
        meta["created"] = old.get("created") if same else time.strftime("%Y-%m-%dT%H:%M:%S")
        store.write_meta(meta)
    return meta


def check_store(uri: str | PartStore, cfg: MerConfig | None = None, manifest_ids: list[str] | None = None
                ) -> dict[str, Any]:
    """Schema and exactly-once check: per-part schema problems, duplicate and missing/extra clip ids."""
    store = PartStore.of(uri)
    problems: list[str] = []
    ids: list[str] = []
    expected = feature_schema(cfg) if cfg is not None else None
    for p in store.parts:
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
    meta = store.meta
    if meta is None:
        problems.append(f"{store.uri}: no {META_FILE}")
    elif cfg is not None and meta.get("config_hash") != config_hash(cfg):
        problems.append(f"{store.uri}: config hash {meta.get('config_hash')} != {config_hash(cfg)}")
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
