"""Prompt building for the enrichment stage: chat template, truncation to the context window, routing.

Both backends consume the token ids built here, so the vLLM and transformers paths see identical
prompts, and the prompt length check is exact (no second tokenisation inside the engine).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mer.enrich import guard
from mer.enrich.prompt import PromptTemplate

# Internal columns added by the prepare step and removed by the stage's finalize step.
ROUTE, STATUS, DESC, SHA, IDS, ERR = (
    "_enrich_route", "_enrich_status", "_enrich_desc", "_enrich_sha", "_enrich_prompt_ids", "_enrich_error",
)
GEN, GEN_TOKENS, GEN_ERR = "_enrich_gen", "_enrich_gen_tokens", "_enrich_gen_error"
INTERNAL = (ROUTE, STATUS, DESC, SHA, IDS, ERR, GEN, GEN_TOKENS, GEN_ERR)
ROUTE_ENGINE, ROUTE_CACHE, ROUTE_SKIP = "engine", "cache", "skip"


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (``from_pretrained``; local directory or hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn opener."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    # Base models without a chat template: plain text turns.
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


class PromptBuilder:
    """``map_batches`` callable: adds the internal routing/prompt columns to a batch.

    Rows with an empty subtitle are routed to ``skip`` (status ``empty_text``), rows whose cached
    enrichment matches their input to ``cache``, the rest to ``engine`` with their prompt token ids.
    """

    def __init__(self, model_path: str, template_text: str, context_columns: list[str],
                 max_model_len: int, max_tokens: int, truncate_input: bool,
                 cache_hits: dict[str, tuple[str, str, str]] | None = None,
                 trust_remote_code: bool = False) -> None:
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.template = PromptTemplate.parse(template_text)
        self.context_columns = list(context_columns)
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        self.truncate_input = truncate_input
        self.cache_hits = cache_hits or {}

    def _fit(self, text: str, context: dict[str, str]) -> tuple[list[int], bool]:
        """Prompt ids for ``text``; cut the subtitle (by tokens) when the prompt would not fit."""
        ids = chat_prompt_ids(self.tokenizer, self.template.messages(text, context))
        # Room for the full answer: vLLM rejects prompts longer than max_model_len outright.
        budget = self.max_model_len - min(self.max_tokens, self.max_model_len // 2)
        if len(ids) <= budget or not self.truncate_input:
            return ids, False
        overhead = len(chat_prompt_ids(self.tokenizer, self.template.messages("", context)))
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = budget - overhead - 8  # slack: BPE merges can differ at the cut
        while keep > 0:
            cut = self.tokenizer.decode(text_ids[:keep], skip_special_tokens=True).rstrip("\ufffd")
            ids = chat_prompt_ids(self.tokenizer, self.template.messages(cut, context))
            if len(ids) <= budget:
                return ids, True
            keep = int(keep * 0.9) - 1
        raise ValueError(f"prompt template alone ({overhead} tokens) does not fit max_model_len {self.max_model_len}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = set(batch.column_names)
        ids_col = batch.column("clip_id").to_pylist() if "clip_id" in cols else [None] * n
        texts = batch.column("text").to_pylist() if "text" in cols else [None] * n
        ctx_cols = {c: batch.column(c).to_pylist() for c in self.context_columns if c in cols}
        route, status, desc, sha, prompt_ids, err = [], [], [], [], [], []
        for i in range(n):
            text = guard.normalize_text(texts[i])
            context = {c: guard.normalize_text(v[i]) for c, v in ctx_cols.items() if v[i] is not None}
            context = {c: v for c, v in context.items() if v}
            key = guard.input_sha(text, context)
            sha.append(key)
            r, s, d, p, e = ROUTE_ENGINE, None, None, [], None
            if not text:
                r, s = ROUTE_SKIP, guard.EMPTY_TEXT
            elif ids_col[i] is not None and ids_col[i] in self.cache_hits and self.cache_hits[ids_col[i]][0] == key:
                r, (_, d, s) = ROUTE_CACHE, self.cache_hits[ids_col[i]]
            else:
                try:
                    p, truncated = self._fit(text, context)
                    if truncated:
                        s, e = guard.TRUNCATED, f"input truncated to a {len(p)}-token prompt (max_model_len {self.max_model_len})"
                except Exception as ex:  # noqa: BLE001 - one bad row must not fail the batch
                    r, s, e = ROUTE_SKIP, guard.ERROR, f"prompt: {type(ex).__name__}: {ex}"
            route.append(r), status.append(s), desc.append(d), prompt_ids.append(p), err.append(e)
        add = {
            ROUTE: pa.array(route, pa.string()), STATUS: pa.array(status, pa.string()),
            DESC: pa.array(desc, pa.string()), SHA: pa.array(sha, pa.string()),
            IDS: pa.array(prompt_ids, pa.list_(pa.int32())), ERR: pa.array(err, pa.string()),
        }
        for name, arr in add.items():
            batch = batch.append_column(name, arr)
        return batch
