"""LLM context enrichment of transcripts: a Ray Data stage (vLLM via ``ray.data.llm`` or transformers),
a Parquet cache keyed by (clip_id, model_id, prompt_hash), the ``mer enrich`` job and its benchmark.

Heavy engines are imported lazily; importing this package needs neither vLLM nor torch.
"""

from mer.enrich.stage import EnrichStage, build_enrich_stage, enrich_dataset, enrich_table

__all__ = ["EnrichStage", "build_enrich_stage", "enrich_dataset", "enrich_table"]
