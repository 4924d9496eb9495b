"""The enrichment stage: Ray Dataset (clip_id, text, …) → same rows + text_enriched, enrich_status.

Steps: prompt building (chat template, truncation, cache lookup, routing) in a small actor; rows that
need generation go to the backend (vLLM engine actor via ``ray.data.llm``, or transformers
``generate``); a finalize step cleans outputs, applies the guard rails, writes cache parts and drops
internal columns. Rows with an empty subtitle or a cache hit never reach the engine.

The stage materialises the prepared text rows to split them by route, so apply it to the text
columns (clip_id, text, context columns) — e.g. the manifest — not to rows carrying decoded frames.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from mer.config import MerConfig
from mer.enrich import guard
from mer.enrich.cache import EnrichCache
from mer.enrich.generators import transformers_generate, vllm_generate
from mer.enrich.prepare import (
    DESC, ERR, GEN, GEN_ERR, GEN_TOKENS, INTERNAL, ROUTE, ROUTE_CACHE, ROUTE_ENGINE, SHA, STATUS,
    PromptBuilder,
)
from mer.enrich.prompt import load_template, prompt_hash
from mer.models.registry import resolve_model_id
from mer.runtime.console import Progress
from mer.runtime.placement import Demand, enrich_demands
from mer.runtime.stall import StallWatch, watched
from mer.runtime.stream import Stage

log = logging.getLogger("mer.enrich")

OUTPUT_COLUMNS = ("text_enriched", "enrich_status", "enrich_note")


def resolve_llm_path(cfg: MerConfig) -> str:
    """Local directory (``tiny:llm`` is built on first use) or hub id of the configured LLM."""
    return str(resolve_model_id(cfg.models.llm, cfg))


def _add_empty_gen(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    batch = batch.append_column(GEN, pa.array([""] * n, pa.string()))
    batch = batch.append_column(GEN_TOKENS, pa.array([0] * n, pa.int64()))
    return batch.append_column(GEN_ERR, pa.array([""] * n, pa.string()))


def finalize_batch(batch: pa.Table, max_output_chars: int, compose: str, model_id: str, p_hash: str,
                   cache_uri: str | None = None, keep_internal: bool = False) -> pa.Table:
    """Guard rails on generated rows, statuses, composed text; write cache parts; drop internals."""
    n = batch.num_rows
    texts = batch.column("text").to_pylist() if "text" in batch.column_names else [None] * n
    route, status, desc = batch[ROUTE].to_pylist(), batch[STATUS].to_pylist(), batch[DESC].to_pylist()
    gen, gen_err, err = batch[GEN].to_pylist(), batch[GEN_ERR].to_pylist(), batch[ERR].to_pylist()
    out_text, out_status, out_err, out_desc = [], [], [], []
    for i in range(n):
        original = texts[i] if texts[i] is not None else ""
        d, s, e = "", status[i], err[i]
        if route[i] == ROUTE_ENGINE:
            if gen_err[i]:
                s, e = guard.ERROR, f"generate: {gen_err[i]}"
            else:
                d = guard.clean_output(gen[i], max_output_chars)
                if not d:
                    s, e = guard.EMPTY_OUTPUT, "; ".join(x for x in (e, "no usable model output") if x)
                else:
                    s = s or guard.OK
        elif route[i] == ROUTE_CACHE:
            d = desc[i] or ""
        out_desc.append(d)
        out_status.append(s or guard.ERROR)
        out_err.append(e)
        out_text.append(guard.compose(original, d, compose) if s != guard.EMPTY_TEXT else original)
    if cache_uri:
        rows: dict[str, list] = {"clip_id": [], "input_sha": [], "description": [], "status": [], "num_tokens": []}
        ids, sha, ntok = batch["clip_id"].to_pylist(), batch[SHA].to_pylist(), batch[GEN_TOKENS].to_pylist()
        for i in range(n):
            if route[i] == ROUTE_ENGINE and out_status[i] in guard.CACHEABLE and ids[i] is not None:
                for k, v in (("clip_id", ids[i]), ("input_sha", sha[i]), ("description", out_desc[i]),
                             ("status", out_status[i]), ("num_tokens", ntok[i])):
                    rows[k].append(v)
        EnrichCache(cache_uri).write_part(rows, model_id, p_hash)
    if not keep_internal:
        batch = batch.drop_columns([c for c in INTERNAL if c in batch.column_names])
    else:
        batch = batch.set_column(batch.column_names.index(DESC), DESC, pa.array(out_desc, pa.string()))
    batch = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
    batch = batch.append_column("text_enriched", pa.array(out_text, pa.string()))
    batch = batch.append_column("enrich_status", pa.array(out_status, pa.string()))
    return batch.append_column("enrich_note", pa.array(out_err, pa.string()))


class EnrichStage:
    """Callable ``Dataset → Dataset`` adding ``text_enriched``, ``enrich_status`` and ``enrich_note``.

    ``enrich_note`` holds the error message of ``error`` rows and notes such as an input truncation.

    Row count and all input columns are preserved (row order is not: the generated and the skipped/cached
    rows are unioned). ``last_stats`` counts the rows of the last call by route (``engine`` = prompts
    actually sent to the generation backend).
    """

    def __init__(self, cfg: MerConfig, cache_dir: str | None = None) -> None:
        self.cfg = cfg
        self.template = load_template(cfg)
        self.prompt_hash = prompt_hash(cfg, self.template)
        self.model_id = cfg.models.llm.model_id
        self.model_path = resolve_llm_path(cfg)
        self.cache_dir = cache_dir if cache_dir is not None else cfg.enrich.cache_dir
        self.last_stats: dict[str, Any] = {}

    def demands(self) -> list[Demand]:
        """The pools this stage starts (its engine and its small CPU steps), for placement checks of a stream
        it runs in (:func:`mer.runtime.placement.stage_demands`)."""
        return enrich_demands(self.cfg)

    def prepare(self, ds: Any) -> Any:
        """Add prompt ids and routes (cache hits resolved) — lazily."""
        e = self.cfg.enrich
        hits = EnrichCache(self.cache_dir).lookup(self.model_id, self.prompt_hash) if self.cache_dir else {}
        return Stage(name="enrich_prompts", fn=PromptBuilder, resources=e.aux_resources, batch_format="pyarrow",
                     constructor_kwargs=dict(
                         model_path=self.model_path, template_text=self.template.source_text,
                         context_columns=list(e.context_columns), max_model_len=e.max_model_len,
                         max_tokens=e.max_tokens, truncate_input=e.truncate_input, cache_hits=hits,
                         trust_remote_code=self.cfg.models.llm.trust_remote_code)).apply(ds)

    def generate(self, ds: Any) -> Any:
        """Run the configured backend on prepared engine-route rows (adds the internal gen columns)."""
        if self.cfg.enrich.backend == "vllm":
            return vllm_generate(self.cfg, self.model_path, ds)
        return transformers_generate(self.cfg, self.model_path, ds)

    def _finalize(self, ds: Any, write_cache: bool = True) -> Any:
        e = self.cfg.enrich
        return Stage(name="enrich_finalize", fn=finalize_batch, kind="task", resources=e.aux_resources,
                     batch_format="pyarrow",
                     fn_kwargs=dict(max_output_chars=e.max_output_chars, compose=e.compose, model_id=self.model_id,
                                    p_hash=self.prompt_hash, cache_uri=self.cache_dir if write_cache else None),
                     # one call per engine batch (each writes one cache part)
                     map_args={"batch_size": e.resources.batch_size}).apply(ds)

    def __call__(self, ds: Any) -> Any:
        prepared = self.prepare(ds).materialize()
        engine = prepared.filter(lambda r: r[ROUTE] == ROUTE_ENGINE).materialize()
        rest = prepared.filter(lambda r: r[ROUTE] != ROUTE_ENGINE).materialize()
        n_engine, n_rest = engine.count(), rest.count()
        self.last_stats = {"rows": n_engine + n_rest, "engine": n_engine, "not_engine": n_rest,
                           "model_id": self.model_id, "prompt_hash": self.prompt_hash,
                           "backend": self.cfg.enrich.backend}
        log.info("enrich: %d rows, %d to the %s engine", n_engine + n_rest, n_engine, self.cfg.enrich.backend)
        no_gen = Stage(name="enrich_no_generation", fn=_add_empty_gen, kind="task",
                       resources=self.cfg.enrich.aux_resources, batch_format="pyarrow", map_args={"batch_size": None})
        done_rest = self._finalize(no_gen.apply(rest), write_cache=False)
        if n_engine == 0:
            return done_rest
        done_engine = self._finalize(self.generate(engine))
        return done_engine.union(done_rest) if n_rest else done_engine


def build_enrich_stage(cfg: MerConfig, cache_dir: str | None = None) -> EnrichStage:
    """The enrichment stage for ``cfg.enrich`` (backend, model, sampling, resources, cache)."""
    return EnrichStage(cfg, cache_dir=cache_dir)


def enrich_dataset(cfg: MerConfig, ds: Any, cache_dir: str | None = None) -> Any:
    """Enrich a Ray Dataset (clip_id, text, …): cached rows are reused, only misses are generated."""
    return build_enrich_stage(cfg, cache_dir)(ds)


def enrich_table(cfg: MerConfig, table: pa.Table, cache_dir: str | None = None,
                 stats: dict[str, Any] | None = None) -> pa.Table:
    """Enrich an Arrow table through the Ray stage; rows come back in input order.

    ``stats`` (optional dict) receives the stage's counts (``engine`` = prompts generated) and status counts.
    """
    import ray

    if "clip_id" not in table.column_names:
        raise ValueError("enrich_table needs a clip_id column")
    order = {cid: i for i, cid in enumerate(table["clip_id"].to_pylist())}
    if len(order) != table.num_rows:
        raise ValueError("enrich_table needs unique clip_ids")
    stage = build_enrich_stage(cfg, cache_dir)
    out = stage(ray.data.from_arrow(table))
    result = None
    if stage.last_stats["rows"]:
        progress = Progress("enrich", stage.last_stats["rows"])
        batches = []
        watch = StallWatch.from_config(cfg, "the enrichment stream")
        for batch in watched(lambda: out.iter_batches(batch_format="pyarrow", batch_size=None), watch):
            batches.append(batch)
            progress.update(batch.num_rows)
        progress.close()
        # Blocks from the generated and the skipped branch can type all-null columns differently.
        result = pa.concat_tables(batches, promote_options="permissive")
    if result is None or result.num_rows == 0:
        result = _empty_like(table)
    idx = sorted(range(result.num_rows), key=lambda i: order[result["clip_id"][i].as_py()])
    result = result.take(pa.array(idx, pa.int64()))
    if stats is not None:
        stats.update(stage.last_stats)
        counts: dict[str, int] = {}
        for s in result["enrich_status"].to_pylist():
            counts[s] = counts.get(s, 0) + 1
        stats["status_counts"] = counts
    return result


def _empty_like(table: pa.Table) -> pa.Table:
    t = table.slice(0, 0)
    for c in OUTPUT_COLUMNS:
        t = t.append_column(c, pa.array([], pa.string()))
    return t
