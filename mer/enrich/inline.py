"""The enrichment inside the extraction stream, after the speech stage: what a clip's transcript is becomes known
only once its audio is decoded and transcribed, so with ``text.source`` asr/auto the LLM enrichment cannot run
before the stream (``enrich.placement: before``) nor on the manifest rows before decode (:class:`EnrichStage`).

:class:`InlineEnricher` is a ``map_batches`` callable class with the same steps as the enrichment stage, on the
rows of its batch: :class:`~mer.enrich.prepare.PromptBuilder` (chat template, truncation, cache hits, routing),
generation of the engine-route rows by an engine the actor owns (vLLM, or the transformers generator) and
:func:`~mer.enrich.stage.finalize_batch` (guard rails, statuses, cache parts). It reads the same cache and writes
the same columns (``text_enriched``, ``enrich_status``, ``enrich_note``): a subtitle enriched before by
``mer enrich`` is a cache hit here. Why an actor pool owning its engine rather than ``ray.data.llm``:
:mod:`mer.enrich.engine`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import MerConfig
from mer.enrich.cache import EnrichCache
from mer.enrich.generators import TransformersGenerator, engine_kwargs
from mer.enrich.prepare import GEN, GEN_ERR, GEN_TOKENS, IDS, ROUTE, ROUTE_ENGINE, PromptBuilder
from mer.enrich.prompt import load_template, prompt_hash, sampling_params
from mer.enrich.stage import OUTPUT_COLUMNS, finalize_batch, resolve_llm_path
from mer.runtime.batches import object_column
from mer.runtime.console import tame_libraries

log = logging.getLogger("mer.enrich")


class InlineEnricher:
    """``map_batches`` callable class: the clip's transcript (``text``) → ``text_enriched``, ``enrich_status``,
    ``enrich_note`` (see the module docstring)."""

    input_columns = ("clip_id", "text")
    output_columns = OUTPUT_COLUMNS

    def __init__(self, cfg: MerConfig, cache_dir: str | None = None) -> None:
        e = cfg.enrich
        self.cfg, self.cache_dir = cfg, cache_dir
        template = load_template(cfg)
        self.model_id, self.p_hash = cfg.models.llm.model_id, prompt_hash(cfg, template)
        self.model_path = resolve_llm_path(cfg)
        hits = EnrichCache(cache_dir).lookup(self.model_id, self.p_hash) if cache_dir else {}
        self.context = list(e.context_columns)
        self.builder = PromptBuilder(self.model_path, template.source_text, self.context, e.max_model_len,
                                     e.max_tokens, e.truncate_input, hits, cfg.models.llm.trust_remote_code)
        self.engine: Any = None  # built on the first row that needs generation
        self.batch_tokens = 0

    def _engine(self) -> Any:
        if self.engine is None:
            t0 = time.perf_counter()
            e = self.cfg.enrich
            if e.backend == "vllm":
                from vllm import LLM  # the engine, in the actors that generate only

                tame_libraries()
                self.engine = LLM(model=self.model_path, **engine_kwargs(self.cfg))
            else:
                self.engine = TransformersGenerator(
                    self.model_path, e.max_tokens, e.max_model_len, e.temperature, e.top_p, e.seed,
                    e.resources.dtype, e.resources.num_gpus > 0, self.cfg.models.llm.trust_remote_code)
            log.info("enrich (inline): %s engine ready in %.1f s", e.backend, time.perf_counter() - t0)
        return self.engine

    def _generate(self, rows: pa.Table) -> pa.Table:
        """Engine-route rows with the generated text, its token count and a per-row error."""
        engine = self._engine()
        if self.cfg.enrich.backend != "vllm":
            return engine(rows)
        from vllm import SamplingParams  # loaded with the engine above

        params = SamplingParams(**sampling_params(self.cfg))
        gen, ntok, err = [], [], []
        prompts = [{"prompt_token_ids": [int(i) for i in p]} for p in rows.column(IDS).to_pylist()]
        try:
            outs = engine.generate(prompts, params, use_tqdm=False)
        except Exception as ex:  # noqa: BLE001 - a failing call costs its rows, never the stream
            outs = [None] * len(prompts)
            message = f"{type(ex).__name__}: {ex}"
        for o in outs:
            if o is None or not o.outputs:
                gen.append(""), ntok.append(0), err.append(message if o is None else "the engine returned no output")
            else:
                gen.append(o.outputs[0].text), ntok.append(len(o.outputs[0].token_ids)), err.append("")
        rows = rows.append_column(GEN, pa.array(gen, pa.string()))
        rows = rows.append_column(GEN_TOKENS, pa.array(ntok, pa.int64()))
        return rows.append_column(GEN_ERR, pa.array(err, pa.string()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        cols = {"clip_id": pa.array([str(v) for v in batch["clip_id"]], pa.string()),
                "text": pa.array([v if isinstance(v, str) else None for v in batch.get("text", [None] * n)],
                                 pa.string())}
        for c in self.context:
            if c in batch:
                cols[c] = pa.array([v if isinstance(v, str) and v else None for v in batch[c]], pa.string())
        prepared = self.builder(pa.table(cols))
        engine_idx = [i for i, r in enumerate(prepared.column(ROUTE).to_pylist()) if r == ROUTE_ENGINE]
        gen, ntok, err = [""] * n, [0] * n, [""] * n
        if engine_idx:
            done = self._generate(prepared.take(pa.array(engine_idx, pa.int64())))
            for j, i in enumerate(engine_idx):
                gen[i], ntok[i], err[i] = done[GEN][j].as_py(), done[GEN_TOKENS][j].as_py(), done[GEN_ERR][j].as_py()
        self.batch_tokens = sum(ntok)
        prepared = prepared.append_column(GEN, pa.array(gen, pa.string()))
        prepared = prepared.append_column(GEN_TOKENS, pa.array(ntok, pa.int64()))
        prepared = prepared.append_column(GEN_ERR, pa.array(err, pa.string()))
        e = self.cfg.enrich
        final = finalize_batch(prepared, e.max_output_chars, e.compose, self.model_id, self.p_hash,
                               cache_uri=self.cache_dir)
        out = dict(batch)
        for c in OUTPUT_COLUMNS:
            out[c] = object_column(final.column(c).to_pylist())
        return out
