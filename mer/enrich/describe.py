"""Visual descriptions in the extraction stream: the decode actor's frames → a vision-language model → a short
description of facial expression, gesture and scene (``extract.describe``).

:class:`Describer` is a ``map_batches`` callable class placed after decode, before the text encoder, which
encodes its text as the ``visual_description`` modality; the LLM vote reads it from the feature store. The model
sees pre-decoded keyframes as ONE image (``frames`` of the decoded frames, evenly spaced, tiled row by row), never
a video URL: whole-video inputs make the engine decode the video again on its own CPU threads (vLLM issue 24728:
the GPU waits at ~20 % while the CPU spikes), and a tiled image is an input every vision-language model takes.

Per row: no frames (a decode failure: ``no_frames``) → not sent; a cached description of the same keyframes
(same model, prompt and settings) → reused; otherwise one request, whose cleaned answer is ``ok``,
``empty_output`` or ``garbled`` (a decoding loop, no words); an engine failure is ``error`` (only that row).
Outputs: ``visual_description_text``, ``describe_status``, ``describe_error``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import numpy as np

from mer.config import MerConfig
from mer.enrich import guard
from mer.enrich.cache import GeneratedTextCache
from mer.enrich.engine import sampling_params, texts_and_tokens, vllm_engine
from mer.models.registry import load_model, load_processor, pick_device, resolve_model_id, slot_spec
from mer.runtime.batches import isolate_rows, object_column

log = logging.getLogger("mer.describe")

NO_FRAMES = "no_frames"
CACHEABLE = frozenset({guard.OK, guard.EMPTY_OUTPUT, guard.GARBLED})


def describe_settings_hash(cfg: MerConfig) -> str:
    """What decides a description besides the frames: model, backend, prompt, frames per image, decoding."""
    d = cfg.extract.describe
    spec = slot_spec(cfg, "vlm")
    blob = {"model": spec.model_id, "revision": spec.revision, "backend": d.backend, "frames": d.frames,
            "prompt": d.prompt, "max_tokens": d.max_tokens, "temperature": d.temperature, "top_p": d.top_p,
            "seed": d.seed, "max_output_chars": d.max_output_chars, "max_compression_ratio": d.max_compression_ratio}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def keyframe_grid(frames: np.ndarray, k: int) -> np.ndarray:
    """``k`` evenly spaced frames of ``frames`` [T, H, W, 3] (segment centres; fewer when T < k) tiled row by
    row into one uint8 image of ``ceil(sqrt(k))`` columns, black where a row is short."""
    t = frames.shape[0]
    k = max(1, min(k, t))
    picked = frames[[min(t - 1, int((i + 0.5) * t / k)) for i in range(k)]]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    h, w = picked.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, f in enumerate(picked):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = f
    return grid


def chat_prompt(processor: Any, text: str) -> str:
    """The model's chat prompt for one image and ``text``: its processor's chat template (which places the
    image), else its tokenizer's."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class VllmVlm:
    """The vision-language model on a vLLM engine: the keyframe grid as ``multi_modal_data={"image": grid}``."""

    def __init__(self, cfg: MerConfig, path: str, prompt: str) -> None:
        self.llm = vllm_engine(path, cfg.extract.describe, slot_spec(cfg, "vlm"), {"image": 1})
        self.stage, self.prompt = cfg.extract.describe, prompt

    def describe(self, grids: list[np.ndarray]) -> list[tuple[str, int]]:
        outs = self.llm.generate([{"prompt": self.prompt, "multi_modal_data": {"image": g}} for g in grids],
                                 sampling_params(self.stage), use_tqdm=False)
        return texts_and_tokens(outs)


class TransformersVlm:
    """The same requests on transformers (``backend: transformers``): the processor's inputs, ``generate``, one
    clip at a time (no padding rules to get right per architecture)."""

    def __init__(self, cfg: MerConfig, path: str, prompt: str, processor: Any) -> None:
        import torch  # the transformers backend only

        spec, d = slot_spec(cfg, "vlm"), cfg.extract.describe
        self.torch, self.stage, self.prompt, self.processor = torch, d, prompt, processor
        self.device = pick_device(d.resources.num_gpus)
        self.model = load_model(spec, cfg, device=self.device, dtype=d.resources.dtype)

    def describe(self, grids: list[np.ndarray]) -> list[tuple[str, int]]:
        torch = self.torch
        kwargs: dict[str, Any] = {"max_new_tokens": self.stage.max_tokens, "do_sample": self.stage.temperature > 0}
        if self.stage.temperature > 0:
            torch.manual_seed(self.stage.seed)
            kwargs.update(temperature=self.stage.temperature, top_p=self.stage.top_p)
        out = []
        for g in grids:
            inputs = self.processor(images=[g], text=[self.prompt], return_tensors="pt").to(self.device)
            with torch.inference_mode():
                seq = self.model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:]
            out.append((self.processor.tokenizer.decode(seq, skip_special_tokens=True), int(seq.numel())))
        return out


class Describer:
    """``map_batches`` callable class: decoded frames → visual descriptions (see the module docstring)."""

    input_columns = ("clip_id", "frames", "decode_status")
    output_columns = ("visual_description_text", "describe_status", "describe_error")

    def __init__(self, cfg: MerConfig, cache_dir: str | None = None) -> None:
        self.cfg, self.stage = cfg, cfg.extract.describe
        spec = slot_spec(cfg, "vlm")
        self.model_id = spec.model_id
        self.path = str(resolve_model_id(spec, cfg))
        self.processor = load_processor(spec, cfg)
        self.prompt = chat_prompt(self.processor, self.stage.prompt)
        self.cache = GeneratedTextCache(cache_dir, self.model_id, describe_settings_hash(cfg)) if cache_dir else None
        self.hits = self.cache.lookup() if self.cache else {}
        self.engine: VllmVlm | TransformersVlm | None = None  # built on the first row that needs it
        self.batch_tokens = 0

    def _engine(self) -> VllmVlm | TransformersVlm:
        if self.engine is None:
            t0 = time.perf_counter()
            self.engine = (VllmVlm(self.cfg, self.path, self.prompt) if self.stage.backend == "vllm"
                           else TransformersVlm(self.cfg, self.path, self.prompt, self.processor))
            log.info("describe: %s engine for %s ready in %.1f s", self.stage.backend, self.model_id,
                     time.perf_counter() - t0)
        return self.engine

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, frames, dstat = list(batch["clip_id"]), list(batch["frames"]), list(batch["decode_status"])
        n = len(ids)
        text, status = [""] * n, [""] * n
        errors: dict[int, str] = {}
        grids: dict[int, np.ndarray] = {}
        shas: dict[int, str] = {}
        self.batch_tokens = 0
        for i in range(n):
            f = frames[i]
            if not isinstance(f, np.ndarray) or f.ndim != 4 or f.shape[0] == 0:
                status[i] = NO_FRAMES
                if dstat[i] not in (None, "", guard.OK):
                    errors[i] = f"describe: no frames ({dstat[i]})"
                continue
            grid = keyframe_grid(f, self.stage.frames)
            shas[i] = hashlib.sha256(grid.tobytes() + str(grid.shape).encode()).hexdigest()[:16]
            if shas[i] in self.hits:
                text[i], _, status[i] = self.hits[shas[i]]
            else:
                grids[i] = grid
        failed: dict[int, str] = {}
        if grids:
            engine = self._engine()

            def forward(rows: list[int]) -> dict[int, tuple[str, int]]:
                return dict(zip(rows, engine.describe([grids[r] for r in rows])))

            new_rows = []
            for i, (raw, ntok) in isolate_rows(sorted(grids), forward, failed, "describe").items():
                text[i], status[i] = guard.media_text(raw, self.stage.max_output_chars,
                                                      self.stage.max_compression_ratio)
                self.batch_tokens += ntok
                new_rows.append({"clip_id": str(ids[i]), "input_sha": shas[i], "text": text[i], "status": status[i],
                                 "num_tokens": ntok})
                self.hits[shas[i]] = (text[i], None, status[i])
            if self.cache is not None and new_rows:
                self.cache.write(new_rows)
        for i, message in failed.items():
            status[i], errors[i] = guard.ERROR, message
        for i in range(n):
            if status[i] != guard.OK:
                text[i] = ""  # only a usable description is the clip's visual evidence
        out = dict(batch)
        out["visual_description_text"] = object_column(text)
        out["describe_status"] = object_column(status)
        out["describe_error"] = object_column([errors.get(i) for i in range(n)])
        return out
