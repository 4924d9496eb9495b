"""Guard rails on LLM input and output: text normalisation, artefact stripping, length caps, statuses."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

# Per-row enrichment statuses (the `enrich_status` column).
OK = "ok"  # generated and cleaned
TRUNCATED = "truncated"  # generated from a subtitle cut to fit max_model_len
EMPTY_TEXT = "empty_text"  # no subtitle: nothing generated, enriched = original
EMPTY_OUTPUT = "empty_output"  # the model produced nothing usable: enriched = original
ERROR = "error"  # generation failed: enriched = original, message in `enrich_error`
CACHEABLE = frozenset({OK, TRUNCATED, EMPTY_OUTPUT})

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_TURN_START = re.compile(r"^\s*<\|im_start\|>\s*(system|user|assistant)?[ \t]*\n?", re.IGNORECASE)
_CHAT_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]", re.IGNORECASE)
# Role prefixes a chat model sometimes echoes ("assistant:", "助手：", "描述：").
_ROLE_PREFIX = re.compile(
    r"^\s*(assistant|system|user|answer|description|response|助手|回答|描述|答)\s*[:：]\s*", re.IGNORECASE
)
_QUOTES = "\"'`“”‘’「」『』《》«»"


def normalize_text(text: str | None) -> str:
    """Subtitle as sent to the LLM: NFC, control characters removed (newlines/tabs become spaces)."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFC", str(text))
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\n\r\t":
            out.append(" ")
        elif cat in ("Cc", "Cs", "Co", "Cn") or (cat == "Cf" and ch not in "\u200d"):
            continue  # controls, lone surrogates, private use, unassigned; keep ZWJ for emoji sequences
        else:
            out.append(ch)
    return re.sub(r"[ \u3000]{2,}", " ", "".join(out)).strip()


def clean_output(generated: str | None, max_chars: int) -> str:
    """Strip chat artefacts (special tokens, role prefixes, <think> blocks, wrapping quotes) and cap length."""
    if not generated:
        return ""
    text = _THINK.sub(" ", str(generated))
    text = _TURN_START.sub("", text)  # an echoed "<|im_start|>assistant\n" opener
    text = _CHAT_TOKENS.sub(" ", text).replace("\ufffd", "")  # U+FFFD: bytes of a cut multi-byte char
    # A model that starts a new turn ("\nuser\n...") has finished its answer.
    text = re.split(r"\n\s*(?:user|system|assistant)\s*\n", text, maxsplit=1, flags=re.IGNORECASE)[0]
    text = normalize_text(text)
    for _ in range(3):  # "assistant: 「...」" needs both strips, in either order
        text = _ROLE_PREFIX.sub("", text).strip().strip(_QUOTES).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        # Prefer ending at a sentence boundary when one is in the last third.
        ends = [cut.rfind(p) for p in "。！？.!?；;"]
        best = max(ends)
        text = cut[: best + 1] if best >= max_chars * 2 // 3 else cut.rstrip()
    return text


def compose(text: str, description: str, mode: str) -> str:
    """The enriched transcript: subtitle + description ("append") or the description ("replace")."""
    if not description:
        return text
    if mode == "replace" or not text:
        return description
    return f"{text}\n{description}"


def input_sha(text: str, context: dict[str, str] | None = None) -> str:
    """Hash of what the prompt was built from; a cached enrichment is reused only while it matches."""
    blob = text + "\x1f" + "\x1f".join(f"{k}={v}" for k, v in sorted((context or {}).items()))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# Statuses of text generated from a clip's media (`asr_status`, `describe_status`), beside OK / EMPTY_OUTPUT / ERROR.
GARBLED = "garbled"  # the engine answered, but with a decoding loop or no words: not used as the clip's text
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>")


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over their zlib-compressed bytes: high for a text that repeats itself (Whisper's test for a
    decoding loop; ordinary speech stays below ~2.4)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def media_text(generated: str | None, max_chars: int, max_ratio: float) -> tuple[str, str]:
    """(cleaned text, status) of an answer about a clip's audio or frames: special tokens and chat artefacts
    stripped; ``empty_output`` when nothing is left; ``garbled`` when it holds no letter or digit or compresses
    better than ``max_ratio`` (the text is still returned, for the record)."""
    text = clean_output(_SPECIAL.sub(" ", generated or ""), max_chars)
    if not text:
        return "", EMPTY_OUTPUT
    if not any(ch.isalnum() for ch in text) or compression_ratio(text) > max_ratio:
        return text, GARBLED
    return text, OK
