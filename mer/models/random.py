"""Random-weight models with the default profile's FULL-SIZE architectures, built offline.

For measuring throughput on real hardware (GPU encoders, the vLLM engine) without a model hub: the
architectures are written here from the published configs of the default profile's models, so shapes,
parameter counts and FLOPs match them; only the weights are random (seeded) and the tokenizers are
byte-level BPEs trained offline on a generated corpus (as :mod:`mer.models.tiny`'s; the model keeps the
real vocabulary size, so embedding and LM-head costs are the real ones).

==============  ==========================================  =================================
slot            architecture (default profile's model)       parameters (from the config)
==============  ==========================================  =================================
global_visual   CLIP ViT-L/14 vision tower, 224 px           ~303 M
face            ViT-B/16, 224 px                             ~86 M
audio           HuBERT-large (chinese-hubert-large)          ~316 M
text            XLM-RoBERTa-large                            ~560 M
llm             Qwen2.5-0.5B-size Qwen2 causal LM            ~494 M
==============  ==========================================  =================================

``mer models random --out DIR`` builds them; the ``random`` profile (``random:<slot>`` ids, resolved to
``storage.random_models_dir/<slot>`` and built on first use) selects them. Weights are saved in
bfloat16 by default (half the disk; the GPU stages run bf16 anyway).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from mer.models.build import build_slots, is_complete, marker
from mer.models.tiny import chatml_tokenizer, xlmr_tokenizer

log = logging.getLogger(__name__)

SLOTS: tuple[str, ...] = ("global_visual", "face", "audio", "text", "llm")
SEED = 0
_VERSIONS: dict[str, str] = {s: "random-1" for s in SLOTS}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The published configs (architecture keys only) of the default profile's models.
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # openai/clip-vit-large-patch14, vision_config
    "global_visual": ("CLIPVisionConfig", "CLIPVisionModel", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    # trpakov/vit-face-expression (google/vit-base-patch16-224-in21k fine-tuned)
    "face": ("ViTConfig", "ViTModel", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)),
    # TencentGameMate/chinese-hubert-large
    "audio": ("HubertConfig", "HubertModel", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu",
        conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_extract_norm="layer",
        do_stable_layer_norm=True, layer_norm_eps=1e-5, vocab_size=32)),
    # FacebookAI/xlm-roberta-large
    "text": ("XLMRobertaConfig", "XLMRobertaModel", dict(
        vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, hidden_act="gelu",
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    # Qwen/Qwen2.5-0.5B-Instruct
    "llm": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, max_window_layers=24)),
}


def model_config(slot: str, overrides: dict[str, Any] | None = None):
    """The transformers config of ``slot`` (``overrides`` replace keys: the tests build shrunken copies)."""
    import transformers

    config_cls, _, kwargs = ARCHITECTURES[slot]
    return getattr(transformers, config_cls)(**{**kwargs, **(overrides or {})})


def parameter_count(slot: str, overrides: dict[str, Any] | None = None) -> int:
    """Parameters of ``slot``'s model, counted on torch's meta device (no memory, no init)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, ARCHITECTURES[slot][1])(model_config(slot, overrides))
    return sum(p.numel() for p in model.parameters())


def _processor(slot: str, dst: Path, config: Any) -> dict[str, Any]:
    """Save the slot's processor or tokenizer; returns config keys that must agree with it."""
    if slot == "global_visual":
        from transformers import CLIPImageProcessor

        size = int(config.image_size)
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(dst)
    elif slot == "face":
        from transformers import ViTImageProcessor

        size = int(config.image_size)
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(dst)
    elif slot == "audio":
        from transformers import Wav2Vec2FeatureExtractor

        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(dst)
    elif slot == "text":
        tok = xlmr_tokenizer(vocab_size=min(8000, config.vocab_size))
        tok.save_pretrained(dst)
    else:
        tok = chatml_tokenizer(vocab_size=min(8000, config.vocab_size))
        tok.save_pretrained(dst)
        eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
        return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": pad}
    return {}


def _builder(slot: str, dtype: str, overrides: dict[str, Any] | None) -> Callable[[Path], None]:
    def build(dst: Path) -> None:
        import torch
        import transformers

        config = model_config(slot, overrides)
        for k, v in _processor(slot, dst, config).items():
            setattr(config, k, v)
        torch.manual_seed(SEED)
        # built directly in the saved dtype: half the memory and time of an fp32 init for bf16
        model = getattr(transformers, ARCHITECTURES[slot][1])._from_config(config, dtype=getattr(torch, dtype))
        if slot == "llm":
            model.generation_config = transformers.GenerationConfig(
                bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id], pad_token_id=config.pad_token_id,
                do_sample=False, max_new_tokens=64)
        model.save_pretrained(dst)
        log.info("random %s: %s, %.0f M parameters, %s", slot, ARCHITECTURES[slot][1],
                 sum(p.numel() for p in model.parameters()) / 1e6, dtype)

    return build


def build_random_models(out_dir: str | os.PathLike, force: bool = False,
                        slots: tuple[str, ...] | list[str] | None = None, dtype: str = "bfloat16",
                        overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Build the full-size random models of ``slots`` (default: all) into ``out_dir/<slot>``.

    Returns ``{slot: absolute directory}``; slots finished with the same dtype and overrides are skipped
    unless ``force``. ``overrides`` (per slot, config keys) builds shrunken copies of the same recipe (the
    tests); the completion marker records dtype and overrides (``describe`` shows them).
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {dtype!r}: use bfloat16, float16 or float32")
    wanted = list(slots) if slots is not None else list(SLOTS)
    overrides = overrides or {}
    builders = {s: _builder(s, dtype, overrides.get(s)) for s in SLOTS}
    versions = {s: _version(s, dtype, overrides.get(s)) for s in SLOTS}
    return build_slots(out_dir, builders, versions, wanted, force=force, kind="random model")


def ensure_random_model(out_dir: str | os.PathLike, slot: str) -> str:
    """Directory of ``slot`` under ``out_dir``: any finished build (whatever its dtype), else one built now
    with the defaults (what the ``random`` profile's ``random:<slot>`` ids resolve through)."""
    path = Path(out_dir).expanduser().resolve() / slot
    if slot in SLOTS and (marker(path) or "").split(":")[0] == _VERSIONS[slot]:
        return str(path)
    log.warning("building the full-size random model %s in %s (once; `mer models random` does it ahead)",
                slot, path.parent)
    return build_random_models(out_dir, slots=[slot])[slot]


def _version(slot: str, dtype: str, overrides: dict[str, Any] | None) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    return f"{_VERSIONS[slot]}:{dtype}" + (f":{extra}" if extra else "")


def random_models_dir(cfg: Any) -> Path:
    """Absolute ``cfg.storage.random_models_dir``."""
    return Path(cfg.storage.random_models_dir).expanduser().resolve()


def describe(out_dir: str | os.PathLike, dtype: str = "bfloat16") -> dict[str, dict[str, Any]]:
    """Slot -> {path, complete (full size, ``dtype``), build (its marker), architecture, parameters (counted
    from the config)} for the CLI."""
    out = Path(out_dir).expanduser().resolve()
    return {s: {"path": str(out / s), "complete": is_complete(out / s, _version(s, dtype, None)),
                "build": marker(out / s), "architecture": ARCHITECTURES[s][1],
                "parameters": parameter_count(s)} for s in SLOTS}
