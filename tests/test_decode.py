"""Decode: sampling, both backends, bad inputs → statuses, timeout → fallback, child recycling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mer.config import load_config
from mer.extract.decode import ClipDecoder
from mer.extract.decoders import DecodeParams, decode_clip, sample_indices, snap_to_keyframes
from mer.extract.subproc import DecodeTimeout, RequestError
from mer.synth.clips import make_clip

from decode_double import DoubleProcess, hanging_decoder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("decode_clips")
    good = make_clip(d / "good.mp4", seconds=1.0, width=160, height=120, gop=5)
    odd = make_clip(d / "odd.mp4", seconds=0.6, width=98, height=150, fps=13, gop=50)  # odd size/rate
    noaudio = make_clip(d / "noaudio.mp4", seconds=1.0, audio=False)
    (d / "zero.mp4").write_bytes(b"")
    data = Path(good).read_bytes()
    (d / "trunc.mp4").write_bytes(data[: len(data) // 3])
    (d / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    hang = make_clip(d / "hang_me.mp4", seconds=1.0)
    return {"good": good, "odd": odd, "noaudio": noaudio, "zero": str(d / "zero.mp4"),
            "trunc": str(d / "trunc.mp4"), "garbage": str(d / "garbage.mp4"),
            "missing": str(d / "missing.mp4"), "hang": hang, "wav_src": good}


# Decode timeouts. Where some request of a test must answer in time (a good clip, the fallback's decode), the
# timeout is ANSWER_S: far above a decode of these clips on a loaded 2-core box (tens of ms), so load cannot make a
# request that answers look hung; each hang then costs ANSWER_S of waiting. Where every request under the timeout
# hangs (the double never answers them), nothing races it and HANG_ONLY_S keeps the wait short.
ANSWER_S = 5.0
HANG_ONLY_S = 1.0


def _cfg(*extra: str):
    return load_config(overrides=["extract.decode.num_frames=4", "extract.decode.frame_size=64",
                                  "extract.decode.timeout_s=20", *extra])


def test_sampling_indices() -> None:
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(2, 4) == [0, 0, 1, 1]  # short clips repeat frames
    assert sample_indices(0, 4) == []
    # snaps within half a stride (stride 25 → 12.5), keeps the others
    assert snap_to_keyframes([12, 37, 62, 87], [0, 30, 60, 90], 100, 0.5) == [0, 30, 60, 90]
    assert snap_to_keyframes([12, 37, 62, 87], [0], 100, 0.5) == [0, 37, 62, 87]
    assert snap_to_keyframes([12, 37], [0, 30], 100, 0.0) == [12, 37]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("sampling", ["uniform", "keyframe"])
def test_backends_decode_frames_and_audio(clips, backend: str, sampling: str) -> None:
    p = DecodeParams(num_frames=5, frame_size=48, sampling=sampling).to_dict()
    r = decode_clip(clips["good"], None, backend, p)
    assert r["frames"].shape == (5, 48, 48, 3) and r["frames"].dtype == np.uint8
    assert r["frames"].std() > 1  # real pixels, not a blank buffer
    a = r["audio"]
    assert a.dtype == np.float32 and a.ndim == 1
    assert abs(len(a) - 16000) < 1600  # 1 s at 16 kHz
    assert 0.05 < np.abs(a).max() <= 1.01  # the tone is there
    odd = decode_clip(clips["odd"], None, backend, p)
    assert odd["frames"].shape == (5, 48, 48, 3)


def test_keyframe_sampling_lands_on_keyframes(clips) -> None:
    # gop=5 at 25 fps: keyframes every 5 frames, so every sample snaps onto one.
    r = decode_clip(clips["good"], None, "decord", DecodeParams(num_frames=4, frame_size=48,
                                                                sampling="keyframe").to_dict())
    assert r["video_info"]["keyframes"] == 5
    assert all(i % 5 == 0 for i in r["video_info"]["indices"])


def test_bad_inputs_get_statuses(clips) -> None:
    dec = ClipDecoder(_cfg())
    try:
        good = dec.decode_one(clips["good"])
        assert good["decode_status"] == "ok" and good["frames"].shape == (4, 64, 64, 3)
        assert good["audio_status"] == "ok" and good["decode_backend"] == "decord"
        noaudio = dec.decode_one(clips["noaudio"])
        assert noaudio["decode_status"] == "ok" and noaudio["frames"] is not None
        assert noaudio["audio_status"] == "no_audio" and noaudio["audio"] is None
        for name, status in (("zero", "decode_error"), ("trunc", "decode_error"), ("garbage", "decode_error"),
                             ("missing", "missing_file")):
            r = dec.decode_one(clips[name])
            assert r["decode_status"] == status, (name, r)
            assert r["audio_status"] == status and r["frames"] is None and r["audio"] is None
            assert r["decode_error"]
        assert "zero-byte" in dec.decode_one(clips["zero"])["decode_error"]
        assert dec.decode_one(None)["decode_status"] == "missing_file"
        # a separate wav/audio file feeds the audio branch of a video without sound
        sep = dec.decode_one(clips["noaudio"], clips["wav_src"])
        assert sep["audio_status"] == "ok" and len(sep["audio"]) > 10000
    finally:
        dec.child.kill()


def test_hanging_decoder_times_out_and_falls_back(clips) -> None:
    # decord "hangs" on this file only; the PyAV fallback must answer
    dec = hanging_decoder("hang_me:decord")(_cfg(f"extract.decode.timeout_s={ANSWER_S}"))
    try:
        r = dec.decode_one(clips["hang"])
        assert r["decode_status"] == "ok" and r["decode_backend"] == "pyav"
        assert r["frames"].shape == (4, 64, 64, 3) and r["audio_status"] == "ok"
        assert f"no answer within {ANSWER_S:g}s" in r["decode_error"]
        assert dec.timeouts == 1 and dec.fallbacks == 1 and dec.child.restarts == 1
        # the replacement child keeps serving the next clips with the primary backend
        assert dec.decode_one(clips["good"])["decode_backend"] == "decord"
    finally:
        dec.child.kill()


def test_hang_without_fallback_is_decode_timeout(clips) -> None:
    dec = hanging_decoder("hang_me")(_cfg(f"extract.decode.timeout_s={HANG_ONLY_S}"))  # every backend hangs
    try:
        r = dec.decode_one(clips["hang"])
        assert r["decode_status"] == "decode_timeout" and r["frames"] is None
        assert r["audio_status"] == "decode_timeout"
        assert dec.timeouts == 2  # decord, then the PyAV fallback
    finally:
        dec.child.kill()


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_child_runs_at_the_configured_extra_niceness() -> None:
    """extract.decode.child_niceness: the decode child yields the CPU to its actor and the other stages."""
    import os

    proc = DoubleProcess(niceness=3)
    try:
        proc.call("reply", {}, timeout=60)
        assert _nice(proc.pid) == min(19, _nice(os.getpid()) + 3)
    finally:
        proc.kill()


def test_child_timeout_kill_and_recycle() -> None:
    proc = DoubleProcess(recycle_every=2)
    try:
        with pytest.raises(DecodeTimeout):
            proc.call("reply", {"hang": True}, timeout=HANG_ONLY_S)
        assert proc.proc is None and proc.restarts == 1
        with pytest.raises(RuntimeError, match="unknown request"):
            proc.call("os_system", {}, timeout=30)
        first = proc.pid
        proc.call("reply", {}, timeout=30)
        assert proc.pid == first and proc.rss() > 0
        proc.call("reply", {}, timeout=30)  # third call on this child: recycled first
        assert proc.pid != first and proc.recycles == 1
    finally:
        proc.kill()


def test_child_map_queues_requests_and_resends_those_behind_a_hang() -> None:
    proc = DoubleProcess(recycle_every=100, window=4)
    try:
        # the requests behind the hang must answer once re-sent to a fresh child: ANSWER_S
        out = proc.map("reply", [{}, {"hang": True}, {}, {}], timeout=ANSWER_S)
        assert out[0] is None and isinstance(out[1], DecodeTimeout) and out[2] is None and out[3] is None
        assert proc.restarts == 1  # one kill; the two queued behind the hang were re-sent to a fresh child
        bad = proc.map("os_system", [{}], timeout=30)
        assert isinstance(bad[0], RequestError) and proc.restarts == 1  # an error in the child is not a crash
    finally:
        proc.kill()


def test_child_map_recycles_mid_batch() -> None:
    proc = DoubleProcess(recycle_every=2, window=4)
    try:
        assert proc.map("reply", [{}] * 5, timeout=30) == [None] * 5
        assert proc.recycles == 2 and proc.restarts == 0 and proc.calls == 1
    finally:
        proc.kill()


def test_batch_decode_matches_in_process_and_survives_a_hang(clips) -> None:
    cfg = _cfg(f"extract.decode.timeout_s={ANSWER_S}")  # the good clips and the fallback must answer
    dec = hanging_decoder("hang_me:decord")(cfg)
    try:
        rows = dec.decode_rows([clips["good"], clips["hang"], clips["missing"], clips["odd"]], [None] * 4)
        assert [r["decode_status"] for r in rows] == ["ok", "ok", "missing_file", "ok"]
        assert [r["decode_backend"] for r in rows] == ["decord", "pyav", None, "decord"]
        assert dec.timeouts == 1 and dec.child.restarts == 1
        # frames and audio crossed the process boundary unchanged (out-of-band buffers)
        p = DecodeParams.from_config(cfg).to_dict()
        ref = decode_clip(clips["good"], None, "decord", p, audio_backend="pyav")
        assert np.array_equal(rows[0]["frames"], ref["frames"]) and np.array_equal(rows[0]["audio"], ref["audio"])
        assert rows[0]["frames"].flags.writeable
        s = dec.stats()
        assert s["clips"] == 4 and s["child_cpu_s"] > 0 and s["busy_s"] > 0
    finally:
        dec.child.kill()


def test_audio_backends_agree_on_a_16khz_track(clips) -> None:
    p = DecodeParams(num_frames=2, frame_size=32).to_dict()
    a = decode_clip(clips["good"], None, "decord", p, want_video=False)["audio"]
    b = decode_clip(clips["good"], None, "decord", p, want_video=False, audio_backend="pyav")["audio"]
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
