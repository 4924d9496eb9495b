"""Offline tiny random-weight models of every ECMF branch (same architectures as the default profile).

Each slot is saved with ``save_pretrained`` (model + processor/tokenizer) into ``<out_dir>/<slot>`` so the
rest of the system loads them through exactly the ``from_pretrained`` path used for real hub models.
Builds are deterministic (fixed seed, deterministic tokenizer training), idempotent (a completion marker
per slot) and safe under concurrent callers (each slot is built in a temp dir and moved with
``os.rename``, which is atomic on one filesystem).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from mer.models.build import build_slots, is_complete

log = logging.getLogger(__name__)

SLOTS: tuple[str, ...] = ("llm", "global_visual", "face", "audio", "text", "asr", "vlm")
SEED = 0
# Hidden sizes differ per branch (64/48/32/96) so a test mixing branches up fails on the dimension.
# Bump a slot's version when its recipe changes: existing builds with another version are rebuilt.
_VERSIONS: dict[str, str] = {"llm": "1", "global_visual": "2", "face": "2", "audio": "3", "text": "2", "asr": "1",
                             "vlm": "1"}

# Emotion vocabulary and everyday subtitle phrases so that the tokenizers learn merges for them; the
# byte-level alphabet still covers every other character.
_ZH_WORDS = (
    "中性 平静 生气 愤怒 气死 开心 高兴 快乐 哈哈 难过 伤心 悲伤 哭 担心 焦虑 害怕 紧张 惊讶 吃惊 意外 天哪 "
    "我 你 他 她 我们 你们 他们 是 不 没有 真的 什么 为什么 怎么 这 那 个 的 了 吗 呢 吧 啊 很 太 好 坏 "
    "今天 明天 昨天 工作 家 朋友 妈妈 爸爸 孩子 老师 学校 钱 事情 知道 觉得 喜欢 讨厌 可以 不能 一定 "
    "说 看 听 想 走 来 去 回来 出去 吃饭 睡觉 电话 时间 问题 情绪 表情 声音 语气 字幕 视频 说话人 描述"
)
_EN_WORDS = (
    "neutral calm angry furious happy glad joy laugh sad sorrow cry worried anxious afraid nervous "
    "surprise surprised shocked wow I you he she we they is not no really what why how this that "
    "today tomorrow work home friend mother father child teacher school money know think like hate "
    "can cannot say look listen want go come back eat sleep phone time problem emotion expression "
    "voice tone subtitle video speaker describe the a an of to and in it"
)


def _corpus(n_lines: int = 600) -> list[str]:
    """A generated Chinese + English corpus; deterministic (no RNG beyond index arithmetic)."""
    zh = _ZH_WORDS.split()
    en = _EN_WORDS.split()
    lines = []
    for i in range(n_lines):
        z = "".join(zh[(i * 7 + k * 13) % len(zh)] for k in range(6 + i % 5))
        e = " ".join(en[(i * 5 + k * 11) % len(en)] for k in range(5 + i % 4))
        lines.append(f"{z}。{e}." if i % 3 else f"{e}! {z}？")
    # Every CJK char that appears in emotion words as a standalone line, so each gets a token.
    lines.extend(sorted(set("".join(zh))))
    return lines


def _train_byte_bpe(vocab_size: int, special_tokens: list[str]):
    """Byte-level BPE trained on the generated corpus; any Unicode text maps (no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048):
    """Byte-level BPE with Qwen's ChatML special tokens and chat template (``<|im_end|>`` ends a turn)."""
    from transformers import PreTrainedTokenizerFast

    raw = _train_byte_bpe(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = _CHATML_TEMPLATE
    return tok


def xlmr_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE with XLM-R's special tokens and ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = _train_byte_bpe(vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _build_llm(dst: Path) -> None:
    """Qwen2ForCausalLM (hidden 128, 4 heads / 2 KV heads -> head_dim 32, which vLLM's CPU attention accepts)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = chatml_tokenizer()
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        max_window_layers=2,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    _seed()
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id], pad_token_id=pad_id, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def _build_global_visual(dst: Path) -> None:
    """CLIPVisionModel (hidden 64, 2 layers, patch 16, 64 px) + CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=64, patch_size=16, projection_dim=64,
    )
    _seed()
    CLIPVisionModel(config).save_pretrained(dst)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(dst)


def _build_face(dst: Path) -> None:
    """ViTModel (hidden 48, 2 layers, patch 16, 64 px) + ViTImageProcessor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=64, patch_size=16,
    )
    _seed()
    ViTModel(config).save_pretrained(dst)
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(dst)


def _build_audio(dst: Path) -> None:
    """HubertModel (hidden 32, 2 layers, 5-layer conv stack) + Wav2Vec2FeatureExtractor.

    The conv stack downsamples 320x like chinese-hubert-large's (50 frames per second of 16 kHz audio): with 20x
    (version 2) a 3 s clip was 2,400 frames and the tiny model's attention cost more than any other encoder."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    # Same variant as chinese-hubert-large: layer-norm feature extractor + stable layer norm.
    config = HubertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        conv_dim=(32,) * 5, conv_kernel=(10, 3, 3, 3, 2), conv_stride=(5, 2, 2, 4, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=32,
    )
    _seed()
    HubertModel(config).save_pretrained(dst)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(dst)


def _build_text(dst: Path) -> None:
    """XLMRobertaModel (hidden 96, 2 layers) + a byte-level BPE tokenizer with XLM-R's special tokens."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = xlmr_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    _seed()
    XLMRobertaModel(config).save_pretrained(dst)
    tok.save_pretrained(dst)


def whisper_processor(vocab_size: int = 1024):
    """A ``WhisperProcessor``: 80-bin log-mel features of 30-s windows and a byte-level BPE with Whisper's
    special tokens (``<|startoftranscript|>``, one ``<|xx|>`` per language, tasks, ``<|nospeech|>``,
    ``<|notimestamps|>``), so vLLM's Whisper prompts and language detection find every token they name."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    raw = _train_byte_bpe(vocab_size, ["<|endoftext|>"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(raw.to_str())["model"]["merges"]]
    tok = WhisperTokenizer(vocab=raw.get_vocab(), merges=merges)
    specials = ["<|startoftranscript|>", *[f"<|{c}|>" for c in LANGUAGES], "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)


def whisper_generation_config(tok):
    """The ``GenerationConfig`` transformers' Whisper ``generate`` needs (language and task ids, no timestamps)."""
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    eot = ids("<|endoftext|>")
    return GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=448, is_multilingual=True, lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=[], begin_suppress_tokens=[eot])


def _build_asr(dst: Path) -> None:
    """WhisperForConditionalGeneration (d_model 128, 4 heads -> head_dim 32 for vLLM's CPU attention, 2+2
    layers; 30-s windows of 80 mel bins like Whisper's) + WhisperProcessor."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    proc = whisper_processor()
    tok = proc.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=128, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"), torch_dtype="float32")
    _seed()
    model = WhisperForConditionalGeneration(config)
    model.generation_config = whisper_generation_config(tok)
    model.save_pretrained(dst)
    proc.save_pretrained(dst)


# The vision-language prompt: the images are placed by the model's processor (BLIP-2 puts its query tokens
# before the prompt), so the template renders the text parts of a message only.
_VLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _build_vlm(dst: Path) -> None:
    """Blip2ForConditionalGeneration: a ViT (hidden 64, 64 px) and a Q-Former (8 query tokens) in front of a
    Qwen2 decoder like the tiny LLM's, + Blip2Processor with a ChatML template. BLIP-2, not Qwen2.5-VL (the
    default profile's): transformers' Qwen2-VL-family processors need torchvision, which the CPU build of
    torch used here does not have, and vLLM serves BLIP-2 with image inputs on CPU."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              GenerationConfig, PreTrainedTokenizerFast, Qwen2Config)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_byte_bpe(1024, specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, additional_special_tokens=specials[1:], model_max_length=4096,
        clean_up_tokenization_spaces=False)
    tok.chat_template = _VLM_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_theta=10000.0, architectures=["Qwen2ForCausalLM"])
    config = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16),
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=64),
        text_config=text.to_dict(), num_query_tokens=8, image_token_index=ids["<image>"], tie_word_embeddings=True)
    _seed()
    model = Blip2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"]], pad_token_id=ids["<|endoftext|>"],
        do_sample=False, max_new_tokens=64)
    model.save_pretrained(dst)
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok,
                          num_query_tokens=8)
    proc.save_pretrained(dst)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "llm": _build_llm,
    "global_visual": _build_global_visual,
    "face": _build_face,
    "audio": _build_audio,
    "text": _build_text,
    "asr": _build_asr,
    "vlm": _build_vlm,
}


def _is_complete(slot_dir: Path) -> bool:
    return is_complete(slot_dir, _VERSIONS.get(slot_dir.name, ""))


def build_tiny_models(out_dir: str | os.PathLike, force: bool = False,
                      slots: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
    """Build the tiny models of ``slots`` (default: all, LLM first) into ``out_dir/<slot>``.

    Returns ``{slot: absolute directory}``. Slots with a completion marker are skipped unless ``force``.
    """
    wanted = list(slots) if slots is not None else list(SLOTS)
    return build_slots(out_dir, _BUILDERS, _VERSIONS, wanted, force=force, kind="tiny model")


def build_tiny_llm(out_dir: str | os.PathLike, force: bool = False) -> str:
    """Build only the tiny Qwen2 LLM slot; returns its directory."""
    return build_tiny_models(out_dir, force=force, slots=["llm"])["llm"]


def tiny_models_dir(cfg) -> Path:
    """Absolute ``cfg.storage.tiny_models_dir`` (relative paths are taken from the current directory)."""
    return Path(cfg.storage.tiny_models_dir).expanduser().resolve()


def ensure_tiny_models(cfg) -> dict[str, str]:
    """Build any missing tiny model into ``cfg.storage.tiny_models_dir``; returns ``{slot: directory}``."""
    return build_tiny_models(tiny_models_dir(cfg))


def describe(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Slot -> {complete, path} for the CLI and tests."""
    out = Path(out_dir).expanduser().resolve()
    return {s: {"path": str(out / s), "complete": _is_complete(out / s)} for s in SLOTS}


__all__ = ["SLOTS", "build_tiny_models", "build_tiny_llm", "ensure_tiny_models", "tiny_models_dir", "describe"]

if __name__ == "__main__":  # pragma: no cover - convenience: python -m mer.models.tiny <dir>
    import sys

    print(json.dumps(build_tiny_models(sys.argv[1] if len(sys.argv) > 1 else ".cache/mer/tiny-models"), indent=1))
