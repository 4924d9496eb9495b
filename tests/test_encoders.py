"""Branch encoders on handmade numpy batches (tiny models) and inside a Ray Data actor pool."""

from __future__ import annotations

import numpy as np
import pytest

from mer.config import MerConfig
from mer.encoders import ENCODERS, AudioEncoder, FaceEncoder, GlobalVisualEncoder, TextEncoder, encoder_dims
from mer.runtime.batches import object_column

DIMS = {"global_visual": 64, "face": 48, "audio": 32, "text": 96}  # the tiny models' hidden sizes


def _cfg(base: MerConfig, **changes: object) -> MerConfig:
    """``base`` with dotted-key changes, re-validated."""
    raw = base.model_dump(mode="json")
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return MerConfig.model_validate(raw)


def _frames(seed: int, t: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, size, size, 3), dtype=np.uint8)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_encoder_dims_and_contract(tiny_config: MerConfig) -> None:
    assert encoder_dims(tiny_config) == DIMS
    assert encoder_dims(_cfg(tiny_config, **{"enrich.text_source": "both"}))["text_enriched"] == DIMS["text"]
    for branch, cls in ENCODERS.items():
        assert cls.branch == branch
        assert {branch, f"{branch}_status", f"{branch}_seq"} <= set(cls.output_columns)
        assert cls.input_columns


def test_global_visual_pools_frames_and_reports_decode_status(tiny_config: MerConfig) -> None:
    cfg = _cfg(tiny_config, **{"extract.encoders.global_visual.keep_sequence": True})
    enc = GlobalVisualEncoder(cfg)
    a, b = _frames(1), _frames(2, t=4)
    batch = {
        "clip_id": np.array(["a", "none", "b", "a80"], dtype=object),
        "frames": object_column([a, None, b, _frames(1, size=80)]),
        "decode_status": np.array(["ok", "decode_timeout", "ok", "ok"], dtype=object),
    }
    out = enc(batch)
    assert list(out["clip_id"]) == ["a", "none", "b", "a80"]  # inputs carried through
    assert list(out["global_visual_status"]) == ["ok", "decode_timeout", "ok", "ok"]
    vec = out["global_visual"]
    assert vec[1] is None
    assert vec[0].shape == (64,) and vec[0].dtype == np.float32 and np.isfinite(vec[0]).all()
    assert out["global_visual_seq"][0].shape == (3, 64) and out["global_visual_seq"][2].shape == (4, 64)
    assert np.allclose(vec[0], out["global_visual_seq"][0].mean(axis=0), atol=1e-6)
    assert not _close(vec[0], vec[2])  # different frames, different features
    assert vec[3].shape == (64,)  # off-size frames are resized by the processor settings
    # Batching across rows does not change a row's vector.
    alone = enc({"frames": object_column([a]), "decode_status": np.array(["ok"], dtype=object)})
    assert _close(alone["global_visual"][0], vec[0])


def test_face_uses_only_frames_with_a_face(tiny_config: MerConfig) -> None:
    enc = FaceEncoder(tiny_config)
    crops = _frames(3, t=4, size=112)
    mask = np.array([True, False, True, True])
    batch = {
        "face_crops": object_column([crops, crops, None, _frames(4, t=4, size=112)]),
        "face_mask": object_column([mask, np.zeros(4, bool), None, np.ones(4, bool)]),
        "face_status": np.array(["ok", "no_face", "decode_error", "ok"], dtype=object),
    }
    out = enc(batch)
    assert list(out["face_status"]) == ["ok", "no_face", "decode_error", "ok"]
    assert out["face"][1] is None and out["face"][2] is None
    assert out["face"][0].shape == (48,)
    assert "face_seq" not in out  # keep_sequence is off by default
    only_faces = enc({"face_crops": object_column([crops[mask]]), "face_mask": object_column([np.ones(3, bool)]),
                      "face_status": np.array(["ok"], dtype=object)})
    assert _close(out["face"][0], only_faces["face"][0])
    all_frames = enc({"face_crops": object_column([crops]), "face_mask": object_column([np.ones(4, bool)])})
    assert not _close(out["face"][0], all_frames["face"][0])  # the mask really drops frame 1
    assert not _close(out["face"][0], out["face"][3])


def test_audio_masks_padding_and_handles_missing(tiny_config: MerConfig) -> None:
    cfg = _cfg(tiny_config, **{"extract.encoders.audio.keep_sequence": True, "extract.decode.max_audio_seconds": 2.0})
    enc = AudioEncoder(cfg)
    rng = np.random.default_rng(0)
    short = (0.1 * rng.normal(size=8000)).astype(np.float32)
    long = (0.1 * rng.normal(size=48000)).astype(np.float32)  # 3 s: capped at 2 s
    batch = {
        "audio": object_column([short, None, long, np.zeros(0, np.float32)]),
        "audio_status": np.array(["ok", "no_audio", "ok", "ok"], dtype=object),
    }
    out = enc(batch)
    assert list(out["audio_status"]) == ["ok", "no_audio", "ok", "no_audio"]
    assert out["audio"][0].shape == (32,) and out["audio"][1] is None and out["audio"][3] is None
    seq_short, seq_long = out["audio_seq"][0], out["audio_seq"][2]
    assert seq_short.shape[1] == 32 and 0 < len(seq_short) < len(seq_long)
    # Padding the short clip next to the long one must not change its features.
    alone = enc({"audio": object_column([short]), "audio_status": np.array(["ok"], dtype=object)})
    assert _close(alone["audio"][0], out["audio"][0])
    capped = enc({"audio": object_column([long[:32000]])})
    assert _close(capped["audio"][0], out["audio"][2])
    assert not _close(out["audio"][0], out["audio"][2])


@pytest.mark.parametrize("source", ["original", "enriched", "both"])
def test_text_source_and_empty_text(tiny_config: MerConfig, source: str) -> None:
    enc = TextEncoder(_cfg(tiny_config, **{"enrich.text_source": source}))
    batch = {
        "text": np.array(["我今天很开心", "", None, "他很生气。"], dtype=object),
        "text_enriched": np.array(["我今天很开心。说话人语气高兴", "", "她很担心", ""], dtype=object),
    }
    out = enc(batch)
    vec = out["text"]
    assert list(out["transcript"]) == ["我今天很开心", "", None, "他很生气。"]  # strings kept
    if source == "enriched":  # enriched text where present, the subtitle otherwise
        assert list(out["text_status"]) == ["ok", "empty_text", "ok", "ok"]
        assert vec[2].shape == (96,)
    else:  # the subtitle
        assert list(out["text_status"]) == ["ok", "empty_text", "empty_text", "ok"]
        assert vec[2] is None
    assert vec[0].shape == (96,) and vec[1] is None
    assert not _close(vec[0], vec[3])
    original_only = TextEncoder(_cfg(tiny_config, **{"enrich.text_source": "original"}))(
        {"text": np.array(["我今天很开心"], dtype=object)})["text"][0]
    assert _close(vec[0], original_only) == (source != "enriched")
    if source == "both":
        assert list(out["text_enriched_status"]) == ["ok", "empty_text", "ok", "ok"]
        assert not _close(out["text_enriched"][0], vec[0])
        assert _close(out["text_enriched"][3], vec[3])  # empty enrichment falls back to the subtitle
    else:
        assert "text_enriched_status" not in out


def test_text_padding_and_truncation(tiny_config: MerConfig) -> None:
    cfg = _cfg(tiny_config, **{"extract.encoders.max_text_tokens": 8, "extract.encoders.text.keep_sequence": True})
    enc = TextEncoder(cfg)
    long_text = "今天我真的非常非常生气，为什么没有人告诉我这件事情？" * 3
    out = enc({"text": np.array(["开心", long_text], dtype=object)})
    assert out["text_seq"][1].shape == (8, 96)  # truncated to max_text_tokens
    alone = enc({"text": np.array(["开心"], dtype=object)})
    assert _close(alone["text"][0], out["text"][0])


def test_disabled_branch_loads_nothing(tiny_config: MerConfig) -> None:
    enc = AudioEncoder(_cfg(tiny_config, **{"extract.encoders.audio.enabled": False}))
    assert enc.model is None
    out = enc({"audio": object_column([np.ones(1600, np.float32)])})
    assert out["audio"][0] is None and out["audio_status"][0] == "disabled"


def test_encoder_in_ray_data_actor_pool(tiny_config: MerConfig, ray_local) -> None:
    import ray

    rows = [{"clip_id": f"c{i}", "text": t} for i, t in enumerate(["我很开心", "", "她很伤心", "hello", "他生气了"])]
    ds = ray.data.from_items(rows).map_batches(
        TextEncoder, fn_constructor_args=(tiny_config,), concurrency=1, batch_size=2, batch_format="numpy",
        num_cpus=tiny_config.extract.encoders.text.resources.num_cpus,
    )
    got = sorted(ds.take_all(), key=lambda r: r["clip_id"])
    assert [r["clip_id"] for r in got] == [f"c{i}" for i in range(5)]
    assert [r["text_status"] for r in got] == ["ok", "empty_text", "ok", "ok", "ok"]
    assert got[1]["text"] is None
    local = TextEncoder(tiny_config)({"text": np.array(["她很伤心"], dtype=object)})["text"][0]
    assert np.asarray(got[2]["text"]).shape == (96,)
    assert _close(np.asarray(got[2]["text"], dtype=np.float32), local)


@pytest.mark.gpu
def test_encoders_on_cuda_bf16(tiny_config: MerConfig) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    changes = {f"extract.encoders.{b}.resources.num_gpus": 0.25 for b in ENCODERS}
    cfg = _cfg(tiny_config, **changes)
    vis = GlobalVisualEncoder(cfg)
    assert vis.device == "cuda" and next(vis.model.parameters()).dtype == torch.bfloat16
    out = vis({"frames": object_column([_frames(1), None])})
    assert out["global_visual"][0].dtype == np.float32 and out["global_visual"][0].shape == (64,)
    cpu = GlobalVisualEncoder(tiny_config)({"frames": object_column([_frames(1)])})["global_visual"][0]
    assert np.corrcoef(cpu, out["global_visual"][0])[0, 1] > 0.98  # bf16 vs fp32: same features
    audio = AudioEncoder(cfg)({"audio": object_column([np.ones(16000, np.float32) * 0.1])})
    assert audio["audio"][0].shape == (32,)
    text = TextEncoder(cfg)({"text": np.array(["我很开心"], dtype=object)})
    assert text["text"][0].shape == (96,)
