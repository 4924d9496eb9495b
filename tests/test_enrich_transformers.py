"""The enrichment stage with the transformers ``generate`` backend (same interface, real from_pretrained)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mer.config import with_overrides
from mer.enrich.stage import build_enrich_stage, enrich_table

# make check leaves the module out: the tiny LLM generates through Ray Data
pytestmark = pytest.mark.slow

ODD = "你\x00好\x07 مرحبا こんにちは 👩\u200d👩\u200d👧"


def _cfg(tiny_config, **kw):
    base = {"backend": "transformers", "resources.num_gpus": 0.0, "max_tokens": 12, "max_model_len": 512,
            "max_output_chars": 80, "temperature": 1.0, "seed": 3, "truncate_input": "true",
            "resources.batch_size": 4, "aux_resources.num_cpus": 0.1, "resources.dtype": "float32",
            "prompt_language": "en", "context_columns": "[caption]"}
    base.update(kw)
    return with_overrides(tiny_config, [f"enrich.{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def table():
    return pa.table({
        "clip_id": ["a", "b", "c", "d", "e", "f"],
        "text": ["I can't believe it!", "我好担心。", "", ODD, "long " * 400, "fine."],
        "caption": ["a man shouts", None, None, None, None, ""],
        "label": ["angry", "worried", None, "happy", "sad", "neutral"],
    })


def test_transformers_stage_on_dataset(ray_local, tiny_config, table, tmp_path):
    import ray

    stage = build_enrich_stage(_cfg(tiny_config), cache_dir=str(tmp_path / "cache"))
    out = stage(ray.data.from_arrow(table)).to_pandas()
    assert len(out) == table.num_rows and sorted(out["clip_id"]) == sorted(table["clip_id"].to_pylist())
    assert {"caption", "label", "text_enriched", "enrich_status", "enrich_note"} <= set(out.columns)
    assert "_enrich_route" not in out.columns and "_enrich_prompt_ids" not in out.columns
    rows = out.set_index("clip_id")
    assert stage.last_stats["engine"] == 5 and stage.last_stats["rows"] == 6
    assert rows.loc["c", "enrich_status"] == "empty_text" and rows.loc["c", "text_enriched"] == ""
    assert rows.loc["e", "enrich_status"] in ("truncated", "empty_output")
    assert "truncated" in rows.loc["e", "enrich_note"]
    assert rows.loc["d", "enrich_status"] in ("ok", "empty_output")
    assert rows.loc["b", "label"] == "worried"
    ok = rows[rows["enrich_status"].isin(["ok", "truncated"])]
    assert len(ok) >= 2
    for cid, r in ok.iterrows():
        assert r["text_enriched"].startswith(r["text"] + "\n")
        assert 0 < len(r["text_enriched"]) - len(r["text"]) - 1 <= 80


def test_seeded_sampling_is_reproducible_and_cache_tracks_text(ray_local, tiny_config, table, tmp_path):
    cfg = _cfg(tiny_config)
    first = enrich_table(cfg, table)  # no cache
    assert first["clip_id"].to_pylist() == table["clip_id"].to_pylist()

    cache = str(tmp_path / "cache")
    stats: dict = {}
    second = enrich_table(cfg, table, cache_dir=cache, stats=stats)  # empty cache: generated again
    assert stats["engine"] == 5
    assert first["text_enriched"].to_pylist() == second["text_enriched"].to_pylist()  # same seed, same text
    changed = table.set_column(1, "text", pa.array(["I can't believe it!", "我好担心！！", "", ODD,
                                                   "long " * 400, "fine."]))
    stats = {}
    again = enrich_table(cfg, changed, cache_dir=cache, stats=stats)
    assert stats["engine"] == 1  # only the clip whose subtitle changed
    assert again["text"][1].as_py() == "我好担心！！"
    assert again["text_enriched"].to_pylist()[2:] == second["text_enriched"].to_pylist()[2:]


def test_greedy_replace_mode_and_empty_table(ray_local, tiny_config, table):
    cfg = _cfg(tiny_config, temperature=0.0, compose="replace")
    out = enrich_table(cfg, table.slice(0, 2))
    for r in out.to_pylist():
        # Greedy output of the random-weight model may be whitespace only: then it falls back.
        if r["enrich_status"] == "ok":
            assert not r["text_enriched"].startswith(r["text"])
        else:
            assert r["enrich_status"] == "empty_output" and r["text_enriched"] == r["text"]
    empty = enrich_table(cfg, table.slice(0, 0))
    assert empty.num_rows == 0 and "text_enriched" in empty.column_names
