"""Video/audio decoders (decord, PyAV): sampled RGB frames at ``frame_size`` and 16 kHz mono audio.

Pure functions on local files; :mod:`mer.extract.subproc` runs them in a child process so a hanging
decoder can be abandoned. Errors are raised (the caller turns them into per-row statuses).

Sampling modes:

* ``uniform`` — the reference (what MERTools-style extractors do): decord ``get_batch`` on uniformly
  spaced indices at full resolution, then a resize on the CPU.
* ``keyframe`` — the cheaper path: each uniform target snaps to the nearest keyframe when one lies
  within ``keyframe_tolerance`` of the sample stride (a keyframe decodes on its own after a seek, any
  other frame needs its GOP prefix), and frames are converted straight to the reduced resolution by the
  decoder's scaler instead of full-resolution RGB plus a resize.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mer.config import transcribes


class NoAudioStream(Exception):
    """The container has no audio track (the video may still be fine)."""


@dataclass(frozen=True)
class DecodeParams:
    """Everything a decode needs; plain data so it crosses the process boundary cheaply."""

    num_frames: int = 16
    frame_size: int = 224
    sample_rate: int = 16000
    max_audio_seconds: float = 10.0
    sampling: str = "keyframe"
    keyframe_tolerance: float = 0.5
    threads: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "DecodeParams":
        """The decode of ``cfg``; with the speech stage on (``text.source`` asr/auto), audio up to
        ``extract.asr.max_seconds`` (the audio encoder still reads its ``decode.max_audio_seconds``)."""
        d = cfg.extract.decode
        audio_s = max(d.max_audio_seconds, cfg.extract.asr.max_seconds) if transcribes(cfg) else d.max_audio_seconds
        return cls(num_frames=d.num_frames, frame_size=d.frame_size, sample_rate=d.audio_sample_rate,
                   max_audio_seconds=audio_s, sampling=d.sampling,
                   keyframe_tolerance=d.keyframe_tolerance, threads=d.threads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_indices(n_frames: int, k: int) -> list[int]:
    """``k`` uniformly spaced frame indices (segment centres) of an ``n_frames`` video; repeats when short."""
    if n_frames <= 0:
        return []
    return [min(n_frames - 1, int((i + 0.5) * n_frames / k)) for i in range(k)]


def snap_to_keyframes(targets: list[int], keys: list[int], n_frames: int, tolerance: float) -> list[int]:
    """Move each target to its nearest keyframe when it is within ``tolerance`` × sample stride."""
    if not targets or not keys or tolerance <= 0:
        return list(targets)
    keys_arr = np.asarray(sorted(keys))
    limit = tolerance * n_frames / max(1, len(targets))
    out = []
    for t in targets:
        j = int(np.argmin(np.abs(keys_arr - t)))
        out.append(int(keys_arr[j]) if abs(int(keys_arr[j]) - t) <= limit else t)
    return out


def scaled_dims(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side = ``size`` and the aspect ratio kept (even numbers for the scaler)."""
    s = size / max(1, min(width, height))
    w, h = max(size, round(width * s)), max(size, round(height * s))
    return w + (w % 2), h + (h % 2)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of uint8 [T, H, W, 3] frames whose shorter side is >= size."""
    h, w = frames.shape[1:3]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """One full-resolution RGB frame → shorter side ``size`` (area filter) → centre square crop."""
    import cv2

    h, w = frame.shape[:2]
    nw, nh = scaled_dims(w, h, size)
    small = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    return center_crop(small[None], size)[0]


def _finish(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[0] == 0:
        raise ValueError("no frames decoded")
    if frames.shape[1:3] != (size, size):
        frames = center_crop(frames, size)
    if frames.shape[1:3] != (size, size):  # smaller than the target (odd sizes): resize each frame
        frames = np.stack([resize_crop(f, size) for f in frames])
    return np.ascontiguousarray(frames, dtype=np.uint8)


def probe_size(path: str) -> tuple[int, int]:
    """(width, height) of the first video stream from the container headers (no frame decoded)."""
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        cc = c.streams.video[0].codec_context
        if not cc.width or not cc.height:
            raise ValueError("video stream has no size")
        return int(cc.width), int(cc.height)


# ----------------------------------------------------------------------------------------------- decord
def _decord():
    import decord

    try:
        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # noqa: BLE001 - logging control is best effort across decord builds
        pass
    return decord


def decode_video_decord(path: str, p: DecodeParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Sampled frames uint8 [T, S, S, 3] with decord, and decode facts (frame count, indices)."""
    decord = _decord()
    if p.sampling == "uniform":
        vr = decord.VideoReader(path, num_threads=p.threads)
        try:
            n = len(vr)
            if n <= 0:
                raise ValueError("video has no frames")
            targets = sample_indices(n, p.num_frames)
            frames = vr.get_batch(targets).asnumpy()
        finally:
            del vr  # readers hold decoder state and buffers: never keep one across clips
        out = np.stack([resize_crop(f, p.frame_size) for f in frames])
        del frames
        return _finish(out, p.frame_size), {"n_frames": n, "indices": targets}
    # The stream's size (a container probe, no decode) sets the reduced output size of the reader.
    w, h = probe_size(path)
    sw, sh = scaled_dims(w, h, p.frame_size)
    try:
        got, idx, uniq, n, keys = _decord_keyframes(decord, path, p, sw, sh)
    except decord.DECORDError as e:
        # decord 0.6 mis-sizes its RGB buffer for a few output widths (e.g. 48, 72): full-size decode then.
        if "size must exactly match" not in str(e):
            raise
        got, idx, uniq, n, keys = _decord_keyframes(decord, path, p, -1, -1)
        got = np.stack([resize_crop(f, p.frame_size) for f in got])
    pos = {u: i for i, u in enumerate(uniq)}
    out = got[[pos[i] for i in idx]]
    del got
    return _finish(out, p.frame_size), {"n_frames": n, "indices": idx, "keyframes": len(keys)}


def _decord_keyframes(decord: Any, path: str, p: DecodeParams, width: int, height: int):
    """Keyframe-snapped sample indices decoded by one reader at (width, height) (-1: native size)."""
    vr = decord.VideoReader(path, num_threads=p.threads, width=width, height=height)
    try:
        n = len(vr)
        if n <= 0:
            raise ValueError("video has no frames")
        targets = sample_indices(n, p.num_frames)
        keys = list(vr.get_key_indices())
        idx = snap_to_keyframes(targets, keys, n, p.keyframe_tolerance)
        uniq = sorted(set(idx))
        got = vr.get_batch(uniq).asnumpy()
    finally:
        del vr  # readers hold decoder state and buffers: never keep one across clips
    return got, idx, uniq, n, keys


def decode_audio_decord(path: str, p: DecodeParams) -> np.ndarray:
    """16 kHz mono float32 waveform (first ``max_audio_seconds``) with decord's AudioReader.

    Not the pipeline's default (``decode.audio_backend: pyav``): decord 0.6 keeps each reader's decoded
    samples (~200 MB per 1,000 3-s clips: the decode child's memory growth), takes ~3x the CPU of
    PyAV, and resamples less exactly: identical to PyAV for a 16 kHz track, but a 44.1 kHz stereo
    track comes out shifted by ~1 ms and distorted (correlation 0.991 with the channel mean resampled
    by scipy, where PyAV's is 1.000). ``mer bench extract`` shows the memory growth.
    """
    decord = _decord()
    try:
        ar = decord.AudioReader(path, sample_rate=p.sample_rate, mono=True)
    except Exception as e:  # noqa: BLE001 - decord raises DECORDError for everything
        if "audio stream" in str(e).lower():
            raise NoAudioStream("no audio track") from None
        raise
    try:
        a = ar[:].asnumpy()
    finally:
        del ar
    a = np.asarray(a, dtype=np.float32).reshape(-1)[: int(p.max_audio_seconds * p.sample_rate)]
    if a.size == 0:
        raise NoAudioStream("audio track is empty")
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------------------------- PyAV
def _threads(vs: Any, threads: int) -> None:
    """Decoder threads of a PyAV stream: 0 = FFmpeg's choice (all cores), else frame threads."""
    if threads != 1:
        vs.thread_type = "AUTO"
    vs.codec_context.thread_count = max(0, int(threads))


def _pyav_reference_frames(path: str, p: DecodeParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Keyframe/reference-frame sampling with PyAV: the decoder skips frames nobody needs.

    A first pass reads packet headers only (no decode) for the frame timestamps and keyframes. With a
    keyframe near every sample the decoder runs with ``skip_frame=NONKEY`` (only keyframes are decoded);
    otherwise with ``NONREF`` (B-frames no other frame references are dropped, which long-GOP H.264 has
    plenty of). Each target takes the nearest decoded frame; only those are converted, at reduced size.
    """
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        vs = c.streams.video[0]
        pts, keys = [], []
        for pkt in c.demux(vs):
            if pkt.pts is None or pkt.size == 0:
                continue
            pts.append(int(pkt.pts))
            if pkt.is_keyframe:
                keys.append(int(pkt.pts))
    if not pts:
        raise ValueError("no video packets")
    order = sorted(pts)
    n = len(order)
    idx = sample_indices(n, p.num_frames)
    target_pts = [order[i] for i in idx]
    stride = n / max(1, p.num_frames)
    key_idx = sorted(order.index(k) for k in set(keys))
    near_key = all(min((abs(k - i) for k in key_idx), default=n) <= p.keyframe_tolerance * stride for i in idx)
    mode = "NONKEY" if near_key else "NONREF"
    best: list[Any] = [None] * len(target_pts)
    dist = [float("inf")] * len(target_pts)
    last = max(target_pts)
    with av.open(path) as c:
        vs = c.streams.video[0]
        _threads(vs, p.threads)
        vs.codec_context.skip_frame = mode
        w, h = vs.codec_context.width, vs.codec_context.height
        decoded = 0
        for frame in c.decode(vs):
            decoded += 1
            fp = frame.pts if frame.pts is not None else -1
            for j, tp in enumerate(target_pts):
                if abs(fp - tp) < dist[j]:
                    dist[j], best[j] = abs(fp - tp), frame
            if fp >= last and all(b is not None for b in best):
                break
    if any(b is None for b in best):
        raise ValueError("no frames decoded")
    sw, sh = scaled_dims(w or p.frame_size, h or p.frame_size, p.frame_size)
    cache: dict[int, np.ndarray] = {}
    out = []
    for b in best:
        if id(b) not in cache:
            cache[id(b)] = b.to_ndarray(width=sw, height=sh, format="rgb24")
        out.append(cache[id(b)])
    return _finish(np.stack(out), p.frame_size), {"n_frames": n, "indices": idx, "keyframes": len(key_idx),
                                                   "skip": mode, "decoded": decoded}


def decode_video_pyav(path: str, p: DecodeParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Sampled frames with PyAV: ``keyframe`` sampling skips unneeded frames (see above); ``uniform``
    decodes sequentially up to the last target. Frames are scaled by the decoder's scaler."""
    import av

    if p.sampling == "keyframe":
        return _pyav_reference_frames(path, p)
    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        vs = c.streams.video[0]
        _threads(vs, p.threads)
        n = int(vs.frames or 0)
        if n <= 0 and vs.duration and vs.average_rate:
            n = int(float(vs.duration * vs.time_base) * float(vs.average_rate))
        n = max(n, 1)
        targets = sample_indices(n, p.num_frames)
        want: dict[int, int] = {}
        for t in targets:
            want[t] = want.get(t, 0) + 1
        last = max(targets)
        sw, sh = scaled_dims(vs.codec_context.width or p.frame_size, vs.codec_context.height or p.frame_size,
                             p.frame_size)
        picked: list[np.ndarray] = []
        i = -1
        for i, frame in enumerate(c.decode(vs)):
            if i in want:
                img = frame.to_ndarray(width=sw, height=sh, format="rgb24")
                picked.extend([img] * want[i])
            if i >= last:
                break
    if not picked:
        raise ValueError(f"no frames decoded (decoded {i + 1} of ~{n})")
    return _finish(np.stack(picked), p.frame_size), {"n_frames": n, "indices": targets}


def decode_audio_pyav(path: str, p: DecodeParams) -> np.ndarray:
    """16 kHz mono float32 waveform with PyAV's resampler."""
    import av

    max_samples = int(p.max_audio_seconds * p.sample_rate)
    with av.open(path) as c:
        if not c.streams.audio:
            raise NoAudioStream("no audio track")
        res = av.AudioResampler(format="flt", layout="mono", rate=p.sample_rate)
        chunks: list[np.ndarray] = []
        total = 0
        for frame in c.decode(c.streams.audio[0]):
            for rf in res.resample(frame):
                a = rf.to_ndarray().reshape(-1)
                chunks.append(a)
                total += a.size
            if total >= max_samples:
                break
        else:
            for rf in res.resample(None):
                chunks.append(rf.to_ndarray().reshape(-1))
    if not chunks:
        raise NoAudioStream("audio track is empty")
    a = np.concatenate(chunks).astype(np.float32)[:max_samples]
    if a.size == 0:
        raise NoAudioStream("audio track is empty")
    return np.ascontiguousarray(a)


VIDEO = {"decord": decode_video_decord, "pyav": decode_video_pyav}
AUDIO = {"decord": decode_audio_decord, "pyav": decode_audio_pyav}


def decode_clip(video_path: str | None, audio_path: str | None, backend: str, params: dict[str, Any],
                want_video: bool = True, want_audio: bool = True, audio_backend: str | None = None
                ) -> dict[str, Any]:
    """Decode one clip; each part fails on its own (``video_error`` / ``audio_error`` / ``no_audio``).

    Video is read with ``backend``, audio with ``audio_backend`` (default: the same). Audio comes from
    ``audio_path`` (a separate wav) when given, else from the video container.
    """
    p = DecodeParams(**params)
    audio_backend = audio_backend or backend
    out: dict[str, Any] = {"backend": backend}
    if want_video and video_path:
        try:
            out["frames"], out["video_info"] = VIDEO[backend](video_path, p)
        except Exception as e:  # noqa: BLE001 - becomes the row's status/message
            out["video_error"] = f"{backend}: {e.__class__.__name__}: {str(e)[:300]}"
    if want_audio:
        src = audio_path or video_path
        try:
            out["audio"] = AUDIO[audio_backend](src, p) if src else None
        except NoAudioStream as e:
            out["no_audio"] = str(e)
        except Exception as e:  # noqa: BLE001
            out["audio_error"] = f"{audio_backend}: {e.__class__.__name__}: {str(e)[:300]}"
    return out
