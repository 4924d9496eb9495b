"""A generated dataset in the MER2025 release layout, with the emotion carried noisily by every modality.

Layout written under ``out_dir`` (same names as the real release, plus the project manifest)::

    video/<name>.mp4           H.264 video + AAC audio (16 kHz mono), made with imageio-ffmpeg's ffmpeg
    audio/<name>.wav           only with ``write_wav=True`` (the release ships pre-extracted audio too)
    subtitle_chieng.csv        name,chinese,english
    track1_train_disdim.csv    name,discrete,valence      (labelled train split)
    track_all_candidates.csv   name                       (unlabelled pool + test)
    test_labels.csv            name,discrete              (held-out labels, for the demo/evaluation)
    manifest.parquet           the project manifest (split train/unlabeled/test; test rows keep their label)
    synth_truth.csv            name,split,label,face_cue,scene_cue,audio_cue,text_cue,broken
                               (hidden truth of every clip, unlabelled ones included, for analysis)

How the label is carried: each clip has a true label; each *cue* (face expression and colour, scene colour/texture,
voice-like audio, subtitle words) independently shows the true label with probability
:data:`RELIABILITY` ``[cue]`` and otherwise, mostly, the label that this modality confuses with it
(:data:`CONFUSABLE`, a different pairing per modality), else a uniformly drawn other label. So any single
modality is above chance (1/6) but well below what combining them gives (see :func:`expected_accuracy`:
the modalities resolve each other's confusions). Within each split
exactly ``round(RELIABILITY[cue] * n)`` clips (a random subset) show the true cue, so small datasets are
as hard as large ones.

Broken inputs (all in the unlabelled pool, listed in the manifest and the candidates CSV): a zero-byte mp4,
a truncated mp4 (first 40 % of its bytes), a clip without an audio track, a row whose video file is missing,
a clip with an empty subtitle and a clip with no face (scene only).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mer.config import LABELS
from mer.data.manifest import manifest_from_rows, write_manifest

# --- tunable difficulty -------------------------------------------------------------------------------
# Probability that a cue shows the clip's true label (else a misleading one, see CONFUSION_PROB). Chance is 1/6.
RELIABILITY: dict[str, float] = {"face": 0.6, "scene": 0.4, "audio": 0.55, "text": 0.6}
# What an untruthful cue shows: with probability CONFUSION_PROB the label this modality confuses with the
# true one (CONFUSABLE), else a uniformly drawn other label. Each modality confuses different pairs (prosody
# mixes up labels of similar arousal, the face those with similar brows...), as in real recordings, so a
# single modality stays ambiguous while the modalities together resolve each other's confusions.
CONFUSION_PROB = 0.8
CONFUSABLE: dict[str, list[tuple[str, str]]] = {
    "scene": [("neutral", "angry"), ("happy", "sad"), ("worried", "surprise")],
    "text": [("neutral", "sad"), ("angry", "surprise"), ("happy", "worried")],
    "face": [("neutral", "worried"), ("angry", "sad"), ("happy", "surprise")],
    "audio": [("neutral", "surprise"), ("angry", "happy"), ("sad", "worried")],
}
# Chance that a subtitle also contains one word of another (random) emotion, and of a second filler phrase.
TEXT_DISTRACTOR_PROB = 0.5
# Audio noise: standard deviation of white noise relative to the signal's peak amplitude.
AUDIO_NOISE = 0.08
# Per-channel jitter of the scene colour (0-255 scale): large enough that colours of labels overlap a bit.
SCENE_JITTER = 18
SAMPLE_RATE = 16000
BROKEN_KINDS: tuple[str, ...] = ("zero_byte", "truncated", "no_audio", "missing_video", "empty_text", "no_face")
TRUNCATE_FRACTION = 0.4

# --- per-label appearance -----------------------------------------------------------------------------
# Scene colour (RGB) and stripe orientation (degrees) of the background.
SCENE_PALETTE: dict[str, tuple[tuple[int, int, int], float]] = {
    "neutral": ((120, 120, 120), 0.0),
    "angry": ((150, 60, 50), 30.0),
    "happy": ((175, 125, 45), 60.0),
    "sad": ((60, 80, 140), 90.0),
    "worried": ((95, 115, 70), 120.0),
    "surprise": ((140, 80, 150), 150.0),
}
# Face expression: eye half-height, brow raise and brow inner-end drop (fractions of the face radius).
FACE_EXPRESSION: dict[str, dict[str, float]] = {
    "neutral": {"eye": 0.09, "brow_raise": 0.0, "brow_inner": 0.0},
    "angry": {"eye": 0.06, "brow_raise": -0.02, "brow_inner": 0.13},
    "happy": {"eye": 0.055, "brow_raise": 0.03, "brow_inner": -0.02},
    "sad": {"eye": 0.065, "brow_raise": 0.0, "brow_inner": -0.10},
    "worried": {"eye": 0.1, "brow_raise": 0.04, "brow_inner": -0.12},
    "surprise": {"eye": 0.105, "brow_raise": 0.07, "brow_inner": 0.0},
}
# Face colour: an offset (RGB) of the skin tone with the expression (a flush of anger, the glow of joy, the
# pallor of sadness and worry...), on top of a per-clip skin-tone jitter of FACE_SKIN_JITTER. Roughly equal
# luminance, so the Haar detector finds every expression alike.
FACE_TINT: dict[str, tuple[int, int, int]] = {
    "neutral": (0, 0, 0),
    "angry": (40, -22, -22),
    "happy": (22, 14, -30),
    "sad": (-24, -8, 30),
    "worried": (-18, 18, -12),
    "surprise": (14, 22, 34),
}
FACE_SKIN_JITTER = 10.0
# Voice-like signal: fundamental (Hz), pitch glide over the clip (fraction), syllable rate (Hz), syllable
# modulation depth, loudness, vibrato rate (Hz) and depth (fraction of f0), harmonic roll-off exponent.
AUDIO_PROFILE: dict[str, dict[str, float]] = {
    "neutral": {"f0": 150, "glide": 0.0, "rate": 3.0, "depth": 0.3, "amp": 0.35, "vib_hz": 0.0, "vib": 0.0, "roll": 1.6},
    "angry": {"f0": 210, "glide": -0.05, "rate": 6.5, "depth": 0.85, "amp": 0.8, "vib_hz": 0.0, "vib": 0.0, "roll": 0.8},
    "happy": {"f0": 270, "glide": 0.25, "rate": 5.0, "depth": 0.6, "amp": 0.55, "vib_hz": 0.0, "vib": 0.0, "roll": 1.2},
    "sad": {"f0": 110, "glide": -0.2, "rate": 1.8, "depth": 0.4, "amp": 0.22, "vib_hz": 0.0, "vib": 0.0, "roll": 2.0},
    "worried": {"f0": 185, "glide": 0.0, "rate": 4.0, "depth": 0.5, "amp": 0.35, "vib_hz": 7.0, "vib": 0.06, "roll": 1.6},
    "surprise": {"f0": 320, "glide": 0.6, "rate": 2.5, "depth": 0.5, "amp": 0.6, "vib_hz": 0.0, "vib": 0.0, "roll": 1.2},
}
# Subtitle vocabulary: (chinese, english) emotion words per label, and neutral filler phrases.
EMOTION_WORDS: dict[str, list[tuple[str, str]]] = {
    "neutral": [("还行", "it is okay"), ("一般般", "so-so"), ("正常", "normal"), ("无所谓", "whatever"),
                ("平静", "calm"), ("照常", "as usual")],
    "angry": [("生气", "angry"), ("气死我了", "this makes me furious"), ("讨厌", "I hate it"),
              ("愤怒", "outraged"), ("滚开", "get lost"), ("太过分了", "this is too much")],
    "happy": [("开心", "happy"), ("太好了", "great"), ("高兴", "glad"), ("哈哈", "haha"),
              ("真棒", "wonderful"), ("快乐", "joyful")],
    "sad": [("难过", "sad"), ("伤心", "heartbroken"), ("想哭", "I want to cry"), ("失望", "disappointed"),
            ("心痛", "it hurts"), ("可惜", "what a pity")],
    "worried": [("担心", "worried"), ("害怕", "afraid"), ("不安", "uneasy"), ("紧张", "nervous"),
                ("怎么办", "what should I do"), ("焦虑", "anxious")],
    "surprise": [("天哪", "oh my god"), ("没想到", "I did not expect that"), ("居然", "actually"),
                 ("惊讶", "surprised"), ("真的吗", "really"), ("不会吧", "no way")],
}
FILLERS: list[tuple[str, str]] = [
    ("今天", "today"), ("我们", "we"), ("他说", "he said"), ("这个事情", "this matter"), ("然后", "then"),
    ("其实", "actually"), ("那个地方", "that place"), ("明天再说", "we will talk tomorrow"),
    ("你知道吗", "you know"), ("刚才", "just now"), ("在公司", "at the office"), ("回家", "going home"),
]


def ffmpeg_exe() -> str:
    """The ffmpeg binary shipped by imageio-ffmpeg (there is no system ffmpeg)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _other_label(rng: np.random.Generator, label: str) -> str:
    others = [lab for lab in LABELS if lab != label]
    return others[int(rng.integers(len(others)))]


def confusable(modality: str, label: str) -> str:
    """The label that ``modality``'s cue shows in place of ``label`` when it misleads (see CONFUSABLE)."""
    for a, b in CONFUSABLE[modality]:
        if label in (a, b):
            return b if label == a else a
    raise ValueError(f"no confusable pair for {label!r} in {modality!r}")


def _wrong_cue(rng: np.random.Generator, modality: str, label: str) -> str:
    return confusable(modality, label) if rng.random() < CONFUSION_PROB else _other_label(rng, label)


def _cue(rng: np.random.Generator, modality: str, label: str, reliability: float) -> str:
    return label if rng.random() < reliability else _wrong_cue(rng, modality, label)


def cue_likelihood(modality: str, cue: str, label: str, reliability: float) -> float:
    """P(cue shown | true label) under the generating model."""
    if cue == label:
        return reliability
    p_other = (1.0 - CONFUSION_PROB) / (len(LABELS) - 1)
    return (1.0 - reliability) * (p_other + (CONFUSION_PROB if cue == confusable(modality, label) else 0.0))


def expected_accuracy(reliability: dict[str, float] | None = None, n: int = 20000, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo accuracy of reading the label off each cue alone, of a plurality vote over all cues (ties
    broken at random) and of the Bayes-optimal reading of all cues together (``bayes``, the ceiling of a
    fusion of perfect per-modality recognisers)."""
    rel = reliability or RELIABILITY
    rng = np.random.default_rng(seed)
    names = list(rel)
    hits = dict.fromkeys(names, 0)
    vote_hits = bayes_hits = 0
    for i in range(n):
        y = LABELS[i % len(LABELS)]
        cues = {m: _cue(rng, m, y, rel[m]) for m in names}
        post = [float(np.prod([cue_likelihood(m, cues[m], lab, rel[m]) for m in names])) for lab in LABELS]
        bayes_hits += LABELS[int(np.argmax(post))] == y
        for m in names:
            hits[m] += cues[m] == y
        counts = {lab: sum(c == lab for c in cues.values()) for lab in LABELS}
        top = max(counts.values())
        winners = [lab for lab in LABELS if counts[lab] == top]
        vote_hits += winners[int(rng.integers(len(winners)))] == y
    out = {m: hits[m] / n for m in names}
    out["vote"] = vote_hits / n
    out["bayes"] = bayes_hits / n
    return out


# --- drawing ------------------------------------------------------------------------------------------
def draw_face(img: np.ndarray, cx: float, cy: float, r: float, label: str = "neutral",
              skin: tuple[int, int, int] = (200, 165, 140)) -> None:
    """Draw a frontal cartoon face showing ``label``'s expression, in place (RGB uint8 image).

    The layout (dark eyes and brows over a lighter skin oval, a bright nose line, a dark mouth and hair) is
    what OpenCV's frontal-face Haar cascade keys on; only the expression parts vary with the label.
    """
    import cv2

    e = FACE_EXPRESSION[label]
    ci, ri = (int(round(cx)), int(round(cy))), max(4, int(round(r)))

    def p(dx: float, dy: float) -> tuple[int, int]:
        return int(round(cx + dx * r)), int(round(cy + dy * r))

    def ax(a: float, b: float) -> tuple[int, int]:
        return max(1, int(round(a * r))), max(1, int(round(b * r)))

    thick = max(1, ri // 11)
    cv2.ellipse(img, p(0, -0.78), ax(0.84, 0.38), 0, 180, 360, (35, 28, 22), -1)  # hair
    cv2.ellipse(img, ci, ax(0.8, 1.0), 0, 0, 360, skin, -1)
    cv2.ellipse(img, p(0, -0.8), ax(0.78, 0.26), 0, 180, 360, (35, 28, 22), -1)  # fringe
    brow_y = -0.38 - e["brow_raise"]
    for s in (-1, 1):
        cv2.ellipse(img, p(s * 0.35, -0.2), ax(0.16, e["eye"]), 0, 0, 360, (40, 30, 30), -1)
        inner, outer = p(s * 0.14, brow_y + e["brow_inner"]), p(s * 0.56, brow_y)
        cv2.line(img, inner, outer, (55, 38, 28), thick + 1)
    cv2.line(img, p(0, -0.1), p(0, 0.25), tuple(int(c * 0.8) for c in skin), max(1, ri // 14))
    dark, lip = (60, 25, 35), (120, 50, 60)
    if label == "neutral":
        cv2.ellipse(img, p(0, 0.5), ax(0.3, 0.06), 0, 0, 360, lip, -1)
    elif label == "happy":  # wide D-shaped smile
        cv2.ellipse(img, p(0, 0.4), ax(0.36, 0.2), 0, 0, 180, dark, -1)
    elif label == "sad":  # frown: upper arc
        cv2.ellipse(img, p(0, 0.64), ax(0.28, 0.14), 0, 180, 360, lip, thick + 1)
    elif label == "angry":  # tight, narrow mouth with dropped corners
        cv2.line(img, p(-0.2, 0.52), p(0.2, 0.52), dark, thick + 1)
        cv2.line(img, p(-0.2, 0.52), p(-0.27, 0.6), dark, thick)
        cv2.line(img, p(0.2, 0.52), p(0.27, 0.6), dark, thick)
    elif label == "worried":  # small wavy mouth
        pts = np.array([p(-0.24 + 0.08 * k, 0.52 + (0.04 if k % 2 else -0.04)) for k in range(7)], np.int32)
        cv2.polylines(img, [pts], False, lip, thick)
    elif label == "surprise":  # open O
        cv2.ellipse(img, p(0, 0.55), ax(0.11, 0.15), 0, 0, 360, dark, -1)
    else:
        raise ValueError(f"unknown label {label!r}")


def scene_background(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """Background of ``label``'s scene: jittered base colour plus oriented stripes and a little noise."""
    colour, angle = SCENE_PALETTE[label]
    base = np.clip(np.array(colour, np.float32) + rng.normal(0, SCENE_JITTER, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    th = np.deg2rad(angle + rng.normal(0, 8))
    period = rng.uniform(0.12, 0.2)
    stripes = 18.0 * np.sin(2 * np.pi * (xx * np.cos(th) + yy * np.sin(th)) / period)
    img = base[None, None, :] + stripes[..., None] + rng.normal(0, 3, (size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_frames(rng: np.random.Generator, face_label: str | None, scene_label: str, *, size: int, n_frames: int
                  ) -> np.ndarray:
    """``[n_frames, size, size, 3]`` RGB frames: the scene, and the face (unless ``face_label`` is None)
    drifting a little around a per-clip position."""
    bg = scene_background(rng, scene_label, size)
    tint = np.array(FACE_TINT[face_label] if face_label is not None else (0, 0, 0), np.float64)
    skin = tuple(int(c) for c in np.clip(np.array([200, 165, 140]) + tint + rng.normal(0, FACE_SKIN_JITTER, 3),
                                         0, 255))
    r = size * rng.uniform(0.27, 0.31)
    cx0 = size / 2 + rng.uniform(-0.05, 0.05) * size
    cy0 = size / 2 + rng.uniform(-0.03, 0.05) * size
    phase = rng.uniform(0, 2 * np.pi, 2)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        img = bg.copy()
        if face_label is not None:
            dx = 0.03 * size * np.sin(0.5 * t + phase[0])
            dy = 0.02 * size * np.sin(0.37 * t + phase[1])
            draw_face(img, cx0 + dx, cy0 + dy, r, face_label, skin)  # type: ignore[arg-type]
        else:
            # Something still moves in a face-less clip (a small block sliding across the scene).
            x = int((t * size / max(1, n_frames)) % max(1, size - size // 8))
            img[size // 10: size // 10 + size // 8, x: x + size // 8] = (30, 170, 60)
        frames[t] = img
    return frames


def render_audio(rng: np.random.Generator, label: str, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A voice-like float32 waveform in [-1, 1]: harmonic tone with ``label``'s pitch, glide, syllable rate,
    loudness and vibrato, plus white noise."""
    prof = AUDIO_PROFILE[label]
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    f0 = prof["f0"] * rng.uniform(0.93, 1.07)
    f = f0 * (1.0 + prof["glide"] * (t / max(seconds, 1e-6) - 0.5))
    if prof["vib"] > 0:
        f = f * (1.0 + prof["vib"] * np.sin(2 * np.pi * prof["vib_hz"] * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    sig = sum(np.sin(k * phase) / k ** prof["roll"] for k in range(1, 7))
    rate = prof["rate"] * rng.uniform(0.9, 1.1)
    env = 1.0 - prof["depth"] * (0.5 + 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    sig = sig / np.max(np.abs(sig)) * env * prof["amp"] * rng.uniform(0.85, 1.15)
    sig = sig + rng.normal(0, AUDIO_NOISE * prof["amp"], n)
    # Scale a too-loud clip down to a peak of 0.85 rather than clipping it: AAC's decoded waveform overshoots
    # clipped (flat) peaks past full scale.
    peak = float(np.max(np.abs(sig)))
    return (sig * (0.85 / peak if peak > 0.85 else 1.0)).astype(np.float32)


def render_text(rng: np.random.Generator, label: str) -> tuple[str, str]:
    """(chinese, english) subtitle: filler phrases, two emotion words of ``label`` and sometimes one
    distractor word of another emotion."""
    def pick(pool: list[tuple[str, str]], k: int) -> list[tuple[str, str]]:
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]

    parts = pick(FILLERS, 2 if rng.random() < 0.5 else 1) + pick(EMOTION_WORDS[label], 2)
    if rng.random() < TEXT_DISTRACTOR_PROB:
        parts += pick(EMOTION_WORDS[_other_label(rng, label)], 1)
    order = rng.permutation(len(parts))
    parts = [parts[i] for i in order]
    zh = "，".join(p[0] for p in parts) + "。"
    en = ", ".join(p[1] for p in parts) + "."
    return zh, en[0].upper() + en[1:]


def save_wav(path: str, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """A float waveform in [-1, 1] as a 16-bit mono wav."""
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((audio * 32767).astype("<i2").tobytes())


def encode_mp4(path: str, frames: np.ndarray, fps: int, wav_path: str | None, gop: int | None = None) -> None:
    """Encode RGB frames (+ an optional wav) to an H.264/AAC mp4 with the bundled ffmpeg; deterministic
    (single-threaded x264, bit-exact flags, no metadata). ``gop``: keyframe interval (default: one a second)."""
    h, w = frames.shape[1:3]
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
    if wav_path:
        cmd += ["-i", wav_path, "-map", "0:v", "-map", "1:a"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(gop or fps), "-pix_fmt", "yuv420p", "-threads", "1",
            "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact"]
    if wav_path:
        cmd += ["-c:a", "aac", "-b:a", "48k", "-ar", str(SAMPLE_RATE), "-ac", "1", "-flags:a", "+bitexact"]
    cmd += [path]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed for {path}: {proc.stderr.decode(errors='replace')[-500:]}")


# --- planning and rendering ---------------------------------------------------------------------------
def _plan(n_train: int, n_unlabeled: int, n_test: int, seed: int, broken: bool) -> list[dict[str, Any]]:
    """Names, splits, labels, cues and broken kinds of every clip (no media), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    total = n_train + n_unlabeled + n_test
    ids = rng.choice(10 ** 6, size=total, replace=False)
    splits = ["train"] * n_train + ["unlabeled"] * n_unlabeled + ["test"] * n_test
    labels: list[str] = []
    for n in (n_train, n_unlabeled, n_test):
        # Balanced classes within each split, so even tiny splits contain every label.
        labs = [LABELS[i % len(LABELS)] for i in range(n)]
        labels += [labs[i] for i in rng.permutation(n)]
    # Exactly round(R * n) clips of each split show the true cue of a modality (a random subset), so even
    # a small dataset has the intended per-modality reliability rather than a noisy draw of it.
    truthful: dict[str, np.ndarray] = {m: np.zeros(total, bool) for m in RELIABILITY}
    start = 0
    for n in (n_train, n_unlabeled, n_test):
        for m, r in RELIABILITY.items():
            truthful[m][start + rng.permutation(n)[: int(round(r * n))]] = True
        start += n
    kinds = list(BROKEN_KINDS) if broken else []
    plan = []
    for i in range(total):
        y = labels[i]
        clip = {"name": f"sample_{int(ids[i]):08d}", "split": splits[i], "label": y}
        for m in RELIABILITY:
            clip[f"{m}_cue"] = y if truthful[m][i] else _wrong_cue(rng, m, y)
        clip.update(seed=int(rng.integers(2 ** 31)), broken="")
        if splits[i] == "unlabeled" and kinds:
            clip["broken"] = kinds.pop(0)
        plan.append(clip)
    return plan


def _render_clip(clip: dict[str, Any], out: Path, seconds: float, size: int, fps: int, write_wav: bool
                 ) -> dict[str, str]:
    """Write one clip's media (per its broken kind) and return its subtitle (chinese, english)."""
    rng = np.random.default_rng(clip["seed"])
    kind = clip["broken"]
    zh, en = render_text(rng, clip["text_cue"])
    if kind == "empty_text":
        zh, en = "", ""
    n_frames = max(1, int(round(seconds * fps)))
    frames = render_frames(rng, None if kind == "no_face" else clip["face_cue"], clip["scene_cue"],
                           size=size, n_frames=n_frames)
    audio = render_audio(rng, clip["audio_cue"], seconds)
    video = out / "video" / f"{clip['name']}.mp4"
    if kind == "missing_video":
        return {"chinese": zh, "english": en}
    if kind == "zero_byte":
        video.write_bytes(b"")
        return {"chinese": zh, "english": en}
    with tempfile.TemporaryDirectory(prefix="mer-synth-") as tmp:
        wav = None
        if kind != "no_audio":
            wav = str(out / "audio" / f"{clip['name']}.wav") if write_wav else os.path.join(tmp, "a.wav")
            save_wav(wav, audio)
        target = os.path.join(tmp, "v.mp4")
        encode_mp4(target, frames, fps, wav)
        data = Path(target).read_bytes()
    if kind == "truncated":
        data = data[: int(len(data) * TRUNCATE_FRACTION)]
    video.write_bytes(data)
    return {"chinese": zh, "english": en}


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _valence(rng: np.random.Generator, label: str) -> float:
    centre = {"neutral": 0.0, "angry": -2.0, "happy": 2.5, "sad": -2.5, "worried": -1.5, "surprise": 0.5}[label]
    return round(float(np.clip(centre + rng.normal(0, 0.5), -5, 5)), 2)


def synth_dataset(out_dir: str | os.PathLike[str], n_train: int = 120, n_unlabeled: int = 40, n_test: int = 60,
                  seed: int = 0, seconds: float = 2.0, size: int = 128, fps: int = 10, *, broken: bool = True,
                  write_wav: bool = False, workers: int = 2) -> dict[str, Any]:
    """Generate a dataset in the MER2025 release layout under the local directory ``out_dir``.

    ``n_unlabeled`` includes the broken clips (one per kind in :data:`BROKEN_KINDS`, the first ones of the
    pool; fewer when the pool is smaller than six). Deterministic for ``seed`` (media bytes included).
    ``workers`` clips render at once; each spends most of its time in its own ffmpeg process.

    Returns ``{"out_dir", "manifest", "n_train", "n_unlabeled", "n_test", "n_clips", "n_video_files",
    "broken": {kind: name}, "reliability", "expected_accuracy", "elapsed_s"}``.
    """
    t0 = time.time()

    if min(n_train, n_unlabeled, n_test) < 0:
        raise ValueError("clip counts must be >= 0")
    out = Path(out_dir).expanduser().resolve()
    (out / "video").mkdir(parents=True, exist_ok=True)
    if write_wav:
        (out / "audio").mkdir(parents=True, exist_ok=True)
    plan = _plan(n_train, n_unlabeled, n_test, seed, broken)

    def job(clip: dict[str, Any]) -> dict[str, str]:
        return _render_clip(clip, out, seconds, size, fps, write_wav)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        subs = list(pool.map(job, plan))

    vrng = np.random.default_rng(seed + 1)
    (out / "subtitle_chieng.csv").write_bytes(
        _csv_bytes(["name", "chinese", "english"], [[c["name"], s["chinese"], s["english"]] for c, s in zip(plan, subs)]))
    (out / "track1_train_disdim.csv").write_bytes(_csv_bytes(
        ["name", "discrete", "valence"], [[c["name"], c["label"], _valence(vrng, c["label"])]
                                          for c in plan if c["split"] == "train"]))
    (out / "track_all_candidates.csv").write_bytes(
        _csv_bytes(["name"], [[c["name"]] for c in plan if c["split"] != "train"]))
    (out / "test_labels.csv").write_bytes(
        _csv_bytes(["name", "discrete"], [[c["name"], c["label"]] for c in plan if c["split"] == "test"]))
    (out / "synth_truth.csv").write_bytes(_csv_bytes(
        ["name", "split", "label", "face_cue", "scene_cue", "audio_cue", "text_cue", "broken"],
        [[c[k] for k in ("name", "split", "label", "face_cue", "scene_cue", "audio_cue", "text_cue", "broken")]
         for c in plan]))
    rows = []
    for c, s in zip(plan, subs):
        wav = out / "audio" / f"{c['name']}.wav"
        rows.append({
            "clip_id": c["name"], "video_uri": str(out / "video" / f"{c['name']}.mp4"),
            "audio_uri": str(wav) if write_wav and wav.exists() else None,
            "text": s["chinese"], "label": c["label"] if c["split"] != "unlabeled" else None,
            "split": c["split"],
        })
    manifest_uri = str(out / "manifest.parquet")
    write_manifest(manifest_from_rows(rows), manifest_uri)
    return {
        "out_dir": str(out), "manifest": manifest_uri,
        "n_train": n_train, "n_unlabeled": n_unlabeled, "n_test": n_test, "n_clips": len(plan),
        "n_video_files": sum(1 for c in plan if c["broken"] != "missing_video"),
        "broken": {c["broken"]: c["name"] for c in plan if c["broken"]},
        "reliability": dict(RELIABILITY), "expected_accuracy": expected_accuracy(n=3000),
        "elapsed_s": round(time.time() - t0, 2),
    }
