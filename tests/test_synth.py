"""Generated MER2025-layout data: layout, broken inputs, real decodable media, Haar-detectable faces,
determinism, and that every modality carries the label (above chance, below the fusion of all)."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mer.config import LABELS
from mer.synth import dataset as synth

HAAR = "haarcascade_frontalface_default.xml"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def truth(synth_root: Path) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in _rows(synth_root / "synth_truth.csv")}


@pytest.fixture(scope="module")
def broken(truth: dict[str, dict[str, str]]) -> dict[str, str]:
    return {r["broken"]: n for n, r in truth.items() if r["broken"]}


@pytest.fixture(scope="module")
def cascade():
    import cv2

    c = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR)
    assert not c.empty()
    return c


def _faces(cascade, frame: np.ndarray, size: int) -> int:
    import cv2

    img = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) if size != frame.shape[0] else frame
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return len(cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24)))


def _frames(path: Path, idx: list[int] | None = None) -> np.ndarray:
    from decord import VideoReader, cpu

    vr = VideoReader(str(path), ctx=cpu(0))
    return vr.get_batch(idx if idx is not None else list(range(len(vr)))).asnumpy()


def test_layout_counts_and_manifest(synth_root: Path, truth: dict[str, dict[str, str]]) -> None:
    # conftest: n_train=36, n_unlabeled=12, n_test=12
    train = _rows(synth_root / "track1_train_disdim.csv")
    cands = _rows(synth_root / "track_all_candidates.csv")
    subs = _rows(synth_root / "subtitle_chieng.csv")
    tests = _rows(synth_root / "test_labels.csv")
    assert list(train[0]) == ["name", "discrete", "valence"] and len(train) == 36
    assert list(cands[0]) == ["name"] and len(cands) == 24
    assert list(subs[0]) == ["name", "chinese", "english"] and len(subs) == 60
    assert list(tests[0]) == ["name", "discrete"] and len(tests) == 12
    assert all(re.fullmatch(r"sample_\d{8}", r["name"]) for r in subs)
    assert {r["discrete"] for r in train} == set(LABELS)  # balanced: every class in the train split
    assert not {r["name"] for r in train} & {r["name"] for r in cands}

    m = pq.read_table(synth_root / "manifest.parquet").to_pylist()
    assert [r["clip_id"] for r in m] == [r["name"] for r in subs]
    by_split = {s: [r for r in m if r["split"] == s] for s in ("train", "unlabeled", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 36, "unlabeled": 12, "test": 12}
    assert all(r["label"] is None for r in by_split["unlabeled"])
    assert all(r["label"] == truth[r["clip_id"]]["label"] for r in by_split["train"] + by_split["test"])
    assert {r["clip_id"] for r in by_split["test"]} == {r["name"] for r in tests}
    n_files = sum(1 for r in m if Path(r["video_uri"]).exists())
    assert n_files == 59  # all but the missing-video row
    assert all(r["audio_uri"] is None for r in m)  # write_wav=False: the mp4 carries the audio


def test_broken_inputs_exist(synth_root: Path, broken: dict[str, str], truth: dict[str, dict[str, str]]) -> None:
    from decord import AudioReader, cpu

    assert set(broken) == set(synth.BROKEN_KINDS)
    assert all(truth[n]["split"] == "unlabeled" for n in broken.values())
    cands = {r["name"] for r in _rows(synth_root / "track_all_candidates.csv")}
    assert set(broken.values()) <= cands
    video = synth_root / "video"
    assert (video / f"{broken['zero_byte']}.mp4").stat().st_size == 0
    assert not (video / f"{broken['missing_video']}.mp4").exists()
    sizes = [p.stat().st_size for p in video.glob("*.mp4") if p.stem not in broken.values()]
    trunc = (video / f"{broken['truncated']}.mp4").stat().st_size
    assert 0 < trunc < 0.6 * min(sizes)
    with pytest.raises(Exception):
        _frames(video / f"{broken['truncated']}.mp4")
    subs = {r["name"]: r for r in _rows(synth_root / "subtitle_chieng.csv")}
    assert subs[broken["empty_text"]]["chinese"] == "" and subs[broken["empty_text"]]["english"] == ""
    assert all(subs[n]["chinese"] for n in subs if n != broken["empty_text"])
    with pytest.raises(Exception, match="audio stream"):
        AudioReader(str(video / f"{broken['no_audio']}.mp4"), ctx=cpu(0), sample_rate=16000)
    # the no-audio clip still has its video frames
    assert _frames(video / f"{broken['no_audio']}.mp4").shape == (20, 128, 128, 3)


def test_normal_clip_decodes_video_and_16k_audio(synth_root: Path, broken: dict[str, str]) -> None:
    from decord import AudioReader, AVReader, cpu

    name = next(r["name"] for r in _rows(synth_root / "track1_train_disdim.csv"))
    path = str(synth_root / "video" / f"{name}.mp4")
    frames = _frames(Path(path))
    assert frames.shape == (20, 128, 128, 3)  # 2 s at 10 fps, 128 px
    assert frames.std() > 10  # not a blank picture
    ar = AudioReader(path, ctx=cpu(0), sample_rate=16000, mono=True)
    audio = ar[:].asnumpy()
    assert audio.shape[0] == 1 and 1.9 * 16000 <= audio.shape[1] <= 2.2 * 16000
    assert 0.05 < np.abs(audio).max() <= 1.0
    av = AVReader(path, ctx=cpu(0), sample_rate=16000, mono=True)
    a, v = av[0:4]
    assert v.shape[0] == 4 and len(a) == 4


def test_haar_detects_faces_in_normal_clips_and_none_in_no_face(synth_root: Path, broken: dict[str, str],
                                                                cascade) -> None:
    video = synth_root / "video"
    normal = sorted(p for p in video.glob("*.mp4") if p.stem not in broken.values())
    hits = {128: [], 64: []}
    for p in normal:
        for fr in _frames(p, [0, 7, 14]):
            for size in hits:
                hits[size].append(_faces(cascade, fr, size) > 0)
    rate = {size: float(np.mean(v)) for size, v in hits.items()}
    assert len(hits[128]) == 3 * 54
    assert rate[128] >= 0.9, rate
    assert rate[64] >= 0.75, rate
    no_face = _frames(video / f"{broken['no_face']}.mp4")
    assert sum(_faces(cascade, fr, s) for fr in no_face for s in (128, 64)) == 0


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = dict(n_train=6, n_unlabeled=6, n_test=2, seed=3, seconds=1.0, size=64)
    a = synth.synth_dataset(tmp_path / "a", **kw)
    b = synth.synth_dataset(tmp_path / "b", **kw)
    c = synth.synth_dataset(tmp_path / "c", **{**kw, "seed": 4})
    assert a["broken"] == b["broken"] and a["n_clips"] == 14 and a["n_video_files"] == 13

    def digest(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".mp4"))
        return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}

    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert len(da) == 5 + 13 and da == db  # 5 CSVs + 13 videos, byte-identical
    assert digest(tmp_path / "c") != da
    ma = pq.read_table(tmp_path / "a" / "manifest.parquet").drop_columns(["video_uri"])
    mb = pq.read_table(tmp_path / "b" / "manifest.parquet").drop_columns(["video_uri"])
    assert ma.equals(mb)


def test_reliability_gives_single_modalities_above_chance_and_fusion_above_all() -> None:
    acc = synth.expected_accuracy(n=6000, seed=1)
    for m, r in synth.RELIABILITY.items():
        assert abs(acc[m] - r) < 0.03
        assert acc[m] > 1 / 6 + 0.15
    assert acc["vote"] > max(acc[m] for m in synth.RELIABILITY) + 0.08
    # each modality's confusions are resolved by the others: the Bayes reading of all cues is far better
    assert acc["bayes"] > acc["vote"] + 0.1


def test_misleading_cues_mostly_show_the_modality_specific_confusion(truth: dict[str, dict[str, str]]) -> None:
    pairs = [frozenset(p) for pairs in synth.CONFUSABLE.values() for p in pairs]
    assert len(set(pairs)) == len(pairs) == 12, "every modality confuses different pairs"
    for m in synth.CONFUSABLE:
        assert {lab for p in synth.CONFUSABLE[m] for lab in p} == set(LABELS)
        wrong = [r for r in truth.values() if r[f"{m}_cue"] != r["label"]]
        partner = sum(r[f"{m}_cue"] == synth.confusable(m, r["label"]) for r in wrong)
        assert wrong and partner / len(wrong) >= 0.5, (m, partner, len(wrong))
        lik = sum(synth.cue_likelihood(m, c, "happy", 0.6) for c in LABELS)
        assert abs(lik - 1.0) < 1e-9


# --- hand-crafted per-modality "oracles" on the media ---------------------------------------------------
def _text_pred(text: str) -> str:
    counts = [sum(text.count(w) for w, _ in synth.EMOTION_WORDS[lab]) for lab in LABELS]
    return LABELS[int(np.argmax(counts))]


def _audio_stats(path: Path) -> np.ndarray:
    from decord import AudioReader, cpu

    a = AudioReader(str(path), ctx=cpu(0), sample_rate=16000, mono=True)[:].asnumpy()[0]
    sr, seg = 16000, 2048

    def f0(x: np.ndarray) -> float:
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[len(x) - 1:]
        lo, hi = sr // 400, sr // 80
        return sr / (lo + int(np.argmax(ac[lo:hi])))

    f0s = [f0(a[i:i + seg]) for i in range(0, len(a) - seg, seg)]
    env = np.array([np.sqrt(np.mean(a[i:i + 160] ** 2)) for i in range(0, len(a) - 160, 160)])
    spec = np.abs(np.fft.rfft(env - env.mean()))
    rate = np.fft.rfftfreq(len(env), 0.01)[1 + int(np.argmax(spec[1:]))]
    return np.array([np.log(np.median(f0s)), np.log(f0s[-1] / f0s[0]), np.log(env.mean()), rate,
                     env.std() / env.mean()])


def _scene_stats(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(np.float64)
    return np.concatenate([f[:12].reshape(-1, 3), f[-12:].reshape(-1, 3)]).mean(0)


def _face_stats(frame: np.ndarray, cascade) -> np.ndarray | None:
    import cv2

    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    boxes = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
    if len(boxes) == 0:
        return None
    x, y, w, h = max(boxes, key=lambda b: int(b[2]) * int(b[3]))
    crop = cv2.resize(gray[y:y + h, x:x + w], (32, 32)).astype(np.float64)
    return ((crop - crop.mean()) / (crop.std() + 1e-6)).ravel()


def _loo_nearest_centroid(x: list[np.ndarray], y: list[str]) -> list[str]:
    """Leave-one-out predictions of a nearest-centroid classifier on standardised features."""
    xs, ys = np.array(x), np.array(y)
    xs = (xs - xs.mean(0)) / (xs.std(0) + 1e-9)
    preds = []
    for i in range(len(xs)):
        keep = np.arange(len(xs)) != i
        cents = {lab: xs[keep & (ys == lab)].mean(0) for lab in LABELS if (keep & (ys == lab)).any()}
        preds.append(min(cents, key=lambda lab: float(np.sum((xs[i] - cents[lab]) ** 2))))
    return preds


def test_each_modality_carries_its_cue_and_the_label(synth_root: Path, truth: dict[str, dict[str, str]],
                                                     cascade) -> None:
    """Simple classifiers on hand-crafted stats, fitted to what each cue looks like (leave-one-out), recover
    the cue from the media, and therefore the true label clearly above chance (1/6), each well below 100 %."""
    subs = {r["name"]: r["chinese"] for r in _rows(synth_root / "subtitle_chieng.csv")}
    names = sorted(n for n, r in truth.items() if not r["broken"])
    feats: dict[str, tuple[list[np.ndarray], list[str]]] = {m: ([], []) for m in ("audio", "scene", "face")}
    text_hits_cue, text_hits_label = [], []
    for n in names:
        path = synth_root / "video" / f"{n}.mp4"
        pred = _text_pred(subs[n])
        text_hits_cue.append(pred == truth[n]["text_cue"])
        text_hits_label.append(pred == truth[n]["label"])
        feats["audio"][0].append(_audio_stats(path))
        feats["audio"][1].append(n)
        first, mid = _frames(path, [0, 10])
        feats["scene"][0].append(_scene_stats(first))
        feats["scene"][1].append(n)
        face = _face_stats(mid, cascade)
        if face is not None:
            feats["face"][0].append(face)
            feats["face"][1].append(n)
    assert len(names) == 54
    acc_cue = {"text": float(np.mean(text_hits_cue))}
    acc_label = {"text": float(np.mean(text_hits_label))}
    for m, (x, ns) in feats.items():
        preds = _loo_nearest_centroid(x, [truth[n][f"{m}_cue"] for n in ns])
        acc_cue[m] = float(np.mean([p == truth[n][f"{m}_cue"] for p, n in zip(preds, ns)]))
        acc_label[m] = float(np.mean([p == truth[n]["label"] for p, n in zip(preds, ns)]))
    print("cue recovery", acc_cue, "label accuracy", acc_label)
    assert acc_cue["text"] >= 0.95 and acc_cue["audio"] >= 0.85 and acc_cue["scene"] >= 0.7
    assert acc_cue["face"] >= 0.4  # crude pixel centroids; the expressions differ in a few pixels
    assert len(feats["face"][1]) >= 48  # a face was found in (almost) every clip's middle frame
    for m in ("text", "audio", "face"):
        assert acc_label[m] >= 0.3, (m, acc_label)
    assert acc_label["scene"] >= 0.22, acc_label  # the weakest cue by design (RELIABILITY["scene"])
    assert all(v <= 0.85 for v in acc_label.values()), acc_label  # no single modality gives the label away
