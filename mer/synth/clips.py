"""Generated test/bench clips: a drawn face that OpenCV's Haar cascade detects and a tone, encoded like the
generated dataset's clips (:func:`mer.synth.dataset.encode_mp4`), and the broken variants (zero-byte, truncated,
no audio, missing, no face)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from mer.synth.dataset import SAMPLE_RATE, draw_face, encode_mp4, save_wav


def make_clip(path: str | os.PathLike[str], *, seconds: float = 1.0, width: int = 160, height: int = 120,
              fps: int = 25, face: bool = True, audio: bool = True, gop: int = 12, seed: int = 0,
              tone_hz: float = 440.0, tone_amplitude: float = 0.2) -> str:
    """Write one mp4; the face (if any) drifts a little so frames differ; ``gop`` = keyframe interval;
    ``tone_amplitude`` 0 gives a silent audio track."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    base = np.zeros((height, width, 3), np.uint8)
    base[:] = rng.integers(40, 110, size=3, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # A gentle texture so the encoder has something to compress, without face-like patterns.
    base = np.clip(base.astype(np.int16) + (8 * np.sin(xx / 9.0) * np.cos(yy / 13.0))[..., None], 0, 255
                   ).astype(np.uint8)
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        img = base.copy()
        if face:
            r = int(min(width, height) * 0.3)
            draw_face(img, width // 2 + int(4 * np.sin(t / 5)), height // 2 + int(3 * np.cos(t / 7)), r)
        else:
            x = (t * 3) % max(1, width - 20)
            img[10:30, x:x + 20] = (20, 200, 40)
        frames[t] = img
    with tempfile.TemporaryDirectory(prefix="mer-clip-") as tmp:
        wav = None
        if audio:
            wav = os.path.join(tmp, "tone.wav")
            t_s = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
            save_wav(wav, (tone_amplitude * np.sin(2 * np.pi * tone_hz * t_s)).astype(np.float32))
        encode_mp4(str(path), frames, fps, wav, gop=gop)
    return str(path)


def make_clip_set(out_dir: str | os.PathLike[str], n_ok: int = 8, *, broken: bool = True, seconds: float = 1.0,
                  width: int = 160, height: int = 120, gop: int = 12, seed: int = 0) -> pa.Table:
    """``n_ok`` good clips plus (with ``broken``) one of each bad input; returns the manifest table.

    Broken clips: ``zero_byte`` (empty file), ``truncated`` (first 30% of a clip), ``no_audio`` (video
    only), ``missing`` (no file), ``no_face`` (no face drawn), ``empty_text`` (good clip, empty subtitle).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = ("neutral", "angry", "happy", "sad", "worried", "surprise")
    rows: list[dict[str, str | None]] = []

    def add(cid: str, path: str, text: str | None = "你好，今天天气不错。", label: str | None = None) -> None:
        rows.append({"clip_id": cid, "video_uri": path, "audio_uri": None, "text": text,
                     "label": label or labels[len(rows) % len(labels)], "split": "train"})

    for i in range(n_ok):
        p = make_clip(out / f"ok_{i:03d}.mp4", seconds=seconds, width=width, height=height, gop=gop,
                      seed=seed + i, tone_hz=220 + 40 * i)
        add(f"ok_{i:03d}", p, text=f"第{i}句字幕，我很高兴。")
    if broken:
        z = out / "zero_byte.mp4"
        z.write_bytes(b"")
        add("zero_byte", str(z))
        good = make_clip(out / "_full.mp4", seconds=seconds, width=width, height=height, gop=gop, seed=seed + 99)
        data = Path(good).read_bytes()
        (out / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
        os.remove(good)
        add("truncated", str(out / "truncated.mp4"))
        add("no_audio", make_clip(out / "no_audio.mp4", seconds=seconds, width=width, height=height, gop=gop,
                                  audio=False, seed=seed + 98))
        add("missing", str(out / "missing.mp4"))
        add("no_face", make_clip(out / "no_face.mp4", seconds=seconds, width=width, height=height, gop=gop,
                                 face=False, seed=seed + 97))
        add("empty_text", make_clip(out / "empty_text.mp4", seconds=seconds, width=width, height=height,
                                    gop=gop, seed=seed + 96), text="")
    return pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in rows[0]]))
