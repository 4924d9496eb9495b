"""Generated test/bench clips (H.264 + AAC via imageio-ffmpeg's ffmpeg): a drawn face that OpenCV's Haar
cascade detects, a tone, and the broken variants (zero-byte, truncated, no audio, missing, no face)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def draw_face(img: np.ndarray, cx: int, cy: int, r: int) -> None:
    """A frontal cartoon face (skin oval, dark eyes and brows, nose, mouth, hair), drawn in place."""
    import cv2

    cv2.ellipse(img, (cx, cy), (int(r * 0.8), r), 0, 0, 360, (190, 160, 140), -1)
    ex, ey = int(r * 0.35), int(r * 0.2)
    for sx in (-1, 1):
        cv2.ellipse(img, (cx + sx * ex, cy - ey), (int(r * 0.16), int(r * 0.09)), 0, 0, 360, (40, 30, 30), -1)
        cv2.line(img, (cx + sx * ex - int(r * 0.2), cy - int(r * 0.38)),
                 (cx + sx * ex + int(r * 0.2), cy - int(r * 0.38)), (60, 40, 30), max(1, r // 12))
    cv2.line(img, (cx, cy - int(r * 0.1)), (cx, cy + int(r * 0.25)), (150, 120, 100), max(1, r // 15))
    cv2.ellipse(img, (cx, cy + int(r * 0.5)), (int(r * 0.3), int(r * 0.1)), 0, 0, 360, (90, 50, 60), -1)
    cv2.ellipse(img, (cx, cy - int(r * 0.75)), (int(r * 0.8), int(r * 0.35)), 0, 180, 360, (30, 25, 20), -1)


def make_clip(path: str | os.PathLike[str], *, seconds: float = 1.0, width: int = 160, height: int = 120,
              fps: int = 25, face: bool = True, audio: bool = True, gop: int = 12, seed: int = 0,
              tone_hz: float = 440.0) -> str:
    """Write one mp4; the face (if any) drifts a little so frames differ; ``gop`` = keyframe interval."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    base = np.zeros((height, width, 3), np.uint8)
    base[:] = rng.integers(40, 110, size=3, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # A gentle texture so the encoder has something to compress, without face-like patterns.
    base = np.clip(base.astype(np.int16) + (8 * np.sin(xx / 9.0) * np.cos(yy / 13.0))[..., None], 0, 255
                   ).astype(np.uint8)
    frames = []
    for t in range(n):
        img = base.copy()
        if face:
            r = int(min(width, height) * 0.3)
            draw_face(img, width // 2 + int(4 * np.sin(t / 5)), height // 2 + int(3 * np.cos(t / 7)), r)
        else:
            x = (t * 3) % max(1, width - 20)
            img[10:30, x:x + 20] = (20, 200, 40)
        frames.append(img)
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
           f"{width}x{height}", "-r", str(fps), "-i", "-"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone_hz}:sample_rate=16000:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(gop), "-pix_fmt", "yuv420p"]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    cmd += [str(path)]
    subprocess.run(cmd, input=np.stack(frames).tobytes(), check=True)
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
