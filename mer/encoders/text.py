"""Transcript encoder: attention-masked mean over the XLM-R token states.

Which transcript is encoded follows ``enrich.text_source``: ``original`` (the clip's transcript: its subtitle or,
with ``text.source`` asr/auto, what the speech stage made of its audio), ``enriched`` (``text_enriched`` when
non-empty, else the transcript) or ``both`` (the transcript as ``text`` and the enriched text, with the same
fallback, as an extra ``text_enriched`` vector column). With ``extract.describe`` on, the vision-language model's
description is encoded too, as the ``visual_description`` vector (status: the description's own when it failed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.config import describes
from mer.encoders.base import BranchEncoder, column, to_f32


def _clean(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v).strip()


class TextEncoder(BranchEncoder):
    """Tokenises a batch of transcripts (truncated to ``max_text_tokens``) and mean-pools under the mask."""

    branch = "text"
    input_columns = ("text", "text_enriched")
    output_columns = ("text", "text_status", "text_seq", "text_error", "transcript")
    # With ``enrich.text_source: both`` also: text_enriched, text_enriched_status, text_enriched_seq,
    # text_enriched_error, transcript_enriched; with ``extract.describe``: visual_description (and its _status,
    # _seq, _error), from visual_description_text and describe_status.
    optional_inputs = ("text_enriched", "visual_description_text", "describe_status")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.source = cfg.enrich.text_source
        self.describes = describes(cfg)
        self.max_tokens = int(cfg.extract.encoders.max_text_tokens)
        self.chunk = 128 if self.device.startswith("cuda") else 32

    def _forward(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.processor(texts, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hs = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].bool()
        return [to_f32(hs[i][mask[i]]) for i in range(len(texts))]

    def _encode_texts(self, texts: list[str], prefix: str, missing: list[str] | None = None) -> dict[str, list[Any]]:
        """``prefix`` vectors of the non-empty ``texts``; an empty one's status is ``missing[i]`` (default
        ``empty_text``)."""
        errors: dict[int, str] = {}
        rows = [i for i, t in enumerate(texts) if t]

        def forward(chunk_rows: list[int]) -> dict[int, np.ndarray]:
            return dict(zip(chunk_rows, self._forward([texts[r] for r in chunk_rows])))

        rows.sort(key=lambda r: len(texts[r]))  # similar lengths per chunk: less padding
        encoded: dict[int, np.ndarray] = {}
        for s in range(0, len(rows), self.chunk):
            encoded.update(self._run_rows(rows[s:s + self.chunk], forward, errors))
        return self.outputs(prefix, missing or ["empty_text"] * len(texts), encoded, errors)

    def encode(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        original = [_clean(v) for v in column(batch, "text", n)]
        enriched = [_clean(v) for v in column(batch, "text_enriched", n)]
        with_fallback = [e or o for e, o in zip(enriched, original)]
        if self.source == "original":
            outs = self._encode_texts(original, "text")
        elif self.source == "enriched":
            outs = self._encode_texts(with_fallback, "text")
        else:
            outs = self._encode_texts(original, "text")
            outs.update(self._encode_texts(with_fallback, "text_enriched"))
        if self.describes:
            described = [_clean(v) for v in column(batch, "visual_description_text", n)]
            why = [s if (s := _clean(v)) and s != "ok" else "empty_text" for v in column(batch, "describe_status", n)]
            outs.update(self._encode_texts(described, "visual_description", why))
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The feature-store contract names the text vector ``text`` (and ``text_enriched``), the same names
        # as the input transcripts; the strings are kept under ``transcript``/``transcript_enriched`` so
        # the stage that writes the store can still carry them.
        n = len(next(iter(batch.values()))) if batch else 0
        keep = {}
        for src, dst in (("text", "transcript"), ("text_enriched", "transcript_enriched")):
            if src in batch and dst not in batch:
                keep[dst] = batch[src]
        out = super().__call__(batch)
        out.update(keep)
        if "transcript" not in out:
            out["transcript"] = np.array([""] * n, dtype=object)
        return out
