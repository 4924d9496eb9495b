"""Model specs -> local directory or hub id, and ``from_pretrained`` loading of models and processors.

Class names from the config are resolved with ``getattr(transformers, name)`` only (never eval/import
strings), so a config can name any transformers class but nothing else.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mer.config import BRANCHES, MerConfig, ModelSpec
from mer.models import random, tiny

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
RANDOM_PREFIX = "random:"
SLOTS: tuple[str, ...] = (*BRANCHES, "llm", "asr", "vlm")


class ModelConfigError(ValueError):
    """A model spec names something that cannot be loaded; the message names the config key."""


def _spec_key(spec: ModelSpec, cfg: MerConfig) -> str:
    """Dotted config key of ``spec`` (for error messages), e.g. ``profiles.tiny.face``."""
    for slot in SLOTS:
        if getattr(cfg.models, slot) is spec or getattr(cfg.models, slot) == spec:
            return f"profiles.{cfg.profile}.{slot}"
    for slot in SLOTS:  # a modified copy of a configured spec: match on the id
        if getattr(getattr(cfg.models, slot), "model_id", None) == spec.model_id:
            return f"profiles.{cfg.profile}.{slot}"
    return f"profiles.{cfg.profile}.<model>"


def resolve_model_id(spec: ModelSpec, cfg: MerConfig) -> str:
    """Local directory for ``tiny:<slot>`` / ``random:<slot>`` (built on first use), else the id unchanged
    (hub id or path)."""
    mid = spec.model_id
    if mid.startswith(TINY_PREFIX):
        kind, slots = "tiny", tiny.SLOTS
        build = lambda slot: tiny.build_tiny_models(tiny.tiny_models_dir(cfg), slots=[slot])  # noqa: E731
    elif mid.startswith(RANDOM_PREFIX):
        kind, slots = "random", random.SLOTS
        build = lambda slot: {slot: random.ensure_random_model(random.random_models_dir(cfg), slot)}  # noqa: E731
    else:
        return mid
    slot = mid.split(":", 1)[1]
    if slot not in slots:
        raise ModelConfigError(f"{_spec_key(spec, cfg)}.model_id: unknown {kind} model {mid!r}; choose from "
                               f"{[f'{kind}:{s}' for s in slots]}")
    return build(slot)[slot]


def _transformers_class(name: str, key: str) -> Any:
    import transformers

    if not name.isidentifier() or name.startswith("_"):
        raise ModelConfigError(f"{key}: {name!r} is not a transformers class name")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as e:
        raise ModelConfigError(f"{key}: transformers has no class {name!r} ({e.__class__.__name__})") from None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ModelConfigError(f"{key}: transformers.{name} is not a loadable class (no from_pretrained)")
    return cls


def resolve_dtype(dtype: str, device: str):
    """``auto``: bfloat16 on CUDA, float32 on CPU; otherwise the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": bool(spec.trust_remote_code)}
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


def load_model(spec: ModelSpec, cfg: MerConfig, device: str = "cpu", dtype: str = "auto"):
    """``<model_class>.from_pretrained`` of the resolved id, on ``device`` in ``dtype``, in eval mode."""
    key = _spec_key(spec, cfg)
    cls = _transformers_class(spec.model_class, f"{key}.model_class")
    path = resolve_model_id(spec, cfg)
    torch_dtype = resolve_dtype(dtype, device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor and model; the log line below says it
    model = cls.from_pretrained(path, dtype=torch_dtype, **_hub_kwargs(spec))
    model.to(device)
    model.eval()
    log.info("loaded %s (%s) on %s as %s", spec.model_id, spec.model_class, device, torch_dtype)
    return model


def load_processor(spec: ModelSpec, cfg: MerConfig):
    """``<processor_class>.from_pretrained`` of the resolved id (tokenizer, image processor, feature extractor)."""
    key = _spec_key(spec, cfg)
    cls = _transformers_class(spec.processor_class, f"{key}.processor_class")
    return cls.from_pretrained(resolve_model_id(spec, cfg), **_hub_kwargs(spec))


def load_config_of(spec: ModelSpec, cfg: MerConfig):
    """The transformers ``PretrainedConfig`` of a spec (cheap: no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_id(spec, cfg), **_hub_kwargs(spec))


def pick_device(num_gpus: float) -> str:
    """``cuda`` when the stage asked for a GPU and one is visible, else ``cpu`` (with a warning if asked)."""
    if num_gpus and num_gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        log.warning("num_gpus=%s requested but CUDA is not available (CUDA_VISIBLE_DEVICES=%s); using CPU",
                    num_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return "cpu"


def model_ids(cfg: MerConfig) -> dict[str, str]:
    """Slot -> configured model id (provenance for the feature store's ``model_ids`` column); a slot the
    profile leaves out is absent."""
    return {slot: spec.model_id for slot in SLOTS if (spec := getattr(cfg.models, slot)) is not None}


def slot_spec(cfg: MerConfig, slot: str) -> ModelSpec:
    """The profile's model of ``slot``; a :class:`ModelConfigError` naming the key when the profile has none."""
    spec = getattr(cfg.models, slot)
    if spec is None:
        raise ModelConfigError(f"profiles.{cfg.profile}.{slot}: this profile has no {slot} model (set one to use "
                               f"the stage that reads it)")
    return spec
