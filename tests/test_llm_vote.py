"""The LLM vote source: strict parsing, prompt, and the tiny LLM through the enrichment stage (transformers)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mer.config import with_overrides
from mer.labels.llm_vote import enriched_descriptions, llm_vote, parse_vote, vote_config
from mer.labels.sources import read_source
from mer.store import storage


@pytest.mark.parametrize("answer,label", [
    ("happy", "happy"), ("Happy.", "happy"), (" 'sad' ", "sad"), ("「担心」", "worried"), ("surprised!", "surprise"),
    ("**Angry**", "angry"), ("neutral。", "neutral"),
])
def test_valid_answers_name_one_label(answer: str, label: str) -> None:
    assert parse_vote(answer) == label


@pytest.mark.parametrize("answer", [None, "", "happy and sad", "I think happy", "joy", "happy happy", "ha ppy",
                                    "happy\nsad", "neutral, angry, happy, sad, worried, surprise"])
def test_anything_else_is_no_vote(answer: str | None) -> None:
    assert parse_vote(answer) is None


def test_vote_prompt_carries_subtitle_and_description(tiny_config) -> None:
    from mer.enrich.prompt import load_template, prompt_hash

    for lang in ("en", "zh"):
        cfg = vote_config(with_overrides(tiny_config, [f"enrich.prompt_language={lang}"]))
        assert cfg.enrich.temperature == 0 and cfg.enrich.compose == "replace"
        assert cfg.enrich.max_tokens == tiny_config.labels.llm_vote_max_tokens
        msgs = load_template(cfg).messages("我好担心。", {"description": "语气紧张"})
        text = "\n".join(m["content"] for m in msgs)
        assert "我好担心。" in text and "语气紧张" in text and "worried" in text
    # the vote and the enrichment never share cache entries
    assert prompt_hash(vote_config(tiny_config)) != prompt_hash(tiny_config)
    enriched = pa.table({"clip_id": ["a", "b", "c"], "text": ["hi", "yo", "ok"],
                         "text_enriched": ["hi\nsounds calm", "yo", "ok\nx"],
                         "enrich_status": ["ok", "empty_output", "error"]})
    assert enriched_descriptions(enriched) == {"a": "sounds calm"}


@pytest.mark.slow
def test_tiny_llm_votes_once_per_clip_and_reuses_its_cache(ray_local, tiny_config, tmp_path) -> None:
    cfg = with_overrides(tiny_config, ["enrich.backend=transformers", "enrich.resources.num_gpus=0",
                                       "enrich.resources.batch_size=4", "enrich.aux_resources.num_cpus=0.1",
                                       "enrich.resources.dtype=float32", "enrich.max_model_len=512",
                                       "enrich.prompt_language=en"])
    manifest = tmp_path / "manifest.parquet"
    storage.write_table(str(manifest), pa.table({
        "clip_id": ["a", "b", "c", "d"], "video_uri": [f"/nowhere/{c}.mp4" for c in "abcd"],
        "text": ["I can't believe it!", "我好担心。", "", "fine."],
        "label": ["angry", None, None, "neutral"], "split": ["train", "unlabeled", "unlabeled", "train"]}))
    enriched = tmp_path / "enriched.parquet"
    storage.write_table(str(enriched), pa.table({"clip_id": ["a", "b"], "text": ["I can't believe it!", "我好担心。"],
                                                 "text_enriched": ["I can't believe it!\nshocked", "我好担心。"],
                                                 "enrich_status": ["ok", "empty_output"]}))
    out = str(tmp_path / "votes.parquet")
    first = llm_vote(cfg, str(manifest), out, enriched_uri=str(enriched))
    votes = storage.read_table(out)
    rows = {r["clip_id"]: r for r in votes.to_pylist()}
    assert sorted(rows) == ["a", "b", "c", "d"] and first["rows"] == 4 and first["generated"] == 3
    assert rows["c"]["vote_status"] == "empty_text" and rows["c"]["label"] is None
    for r in rows.values():
        assert r["vote_status"] in {"ok", "unparsed", "empty_text", "empty_output", "error"}
        # a label only where the answer parses as exactly one label; garbage is no vote
        assert r["label"] == (parse_vote(r["answer"]) if r["vote_status"] == "ok" else None)
        assert (r["answer"] is not None) == (r["vote_status"] in ("ok", "unparsed", "error"))
    assert first["votes"] == sum(r["label"] is not None for r in rows.values())
    second = llm_vote(cfg, str(manifest), out, enriched_uri=str(enriched))
    assert second["generated"] == 0
    assert storage.read_table(out).to_pylist() == votes.to_pylist()
    source = read_source("llm", out)
    assert source.kind == "label" and source.ids == ["a", "b", "c", "d"]
