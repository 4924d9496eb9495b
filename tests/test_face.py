"""Face stage: Haar detection of the largest face, square crops, mask and the no-face fallback."""

from __future__ import annotations

import numpy as np
import pytest

from mer.config import load_config
from mer.extract.face import FaceDetector, cascade_path, square_crop
from mer.synth.dataset import draw_face


def _frames(n: int, size: int, face: bool, r: int | None = None) -> np.ndarray:
    out = np.full((n, size, size, 3), 80, np.uint8)
    if face:
        for t in range(n):
            draw_face(out[t], size // 2 + t, size // 2, r or int(size * 0.3))
    return out


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(load_config(overrides=["extract.face.crop_size=48"]))


def test_detects_crops_and_masks(detector: FaceDetector) -> None:
    frames = _frames(3, 128, face=True)
    frames[1] = 80  # no face in the middle frame
    out = detector.process(frames, "ok")
    assert out["face_status"] == "ok"
    assert out["face_mask"].tolist() == [True, False, True]
    crops = out["face_crops"]
    assert crops.shape == (3, 48, 48, 3) and crops.dtype == np.uint8
    assert crops[1].max() == 0 and crops[0].std() > 5
    # aligned: the face (skin tone) fills the centre of the crop
    centre = crops[0, 18:30, 18:30].reshape(-1, 3).mean(0)
    assert centre[0] > 120


def test_small_frames_are_upscaled_for_detection(detector: FaceDetector) -> None:
    out = detector.process(_frames(2, 64, face=True), "ok")
    assert out["face_status"] == "ok" and out["face_mask"].all()


def test_largest_face_wins(detector: FaceDetector) -> None:
    img = np.full((160, 240, 3), 80, np.uint8)
    draw_face(img, 50, 60, 22)
    draw_face(img, 170, 85, 48)
    x, y, w, h = detector.detect(img)
    assert abs((x + w / 2) - 170) < 15 and w > 60


def test_no_face_and_upstream_failure(detector: FaceDetector) -> None:
    out = detector.process(_frames(4, 96, face=False), "ok")
    assert out["face_status"] == "no_face" and out["face_crops"] is None
    assert out["face_mask"].tolist() == [False] * 4 and "no face" in out["face_detect_error"]
    failed = detector.process(None, "missing_file")
    assert failed["face_status"] == "missing_file" and failed["face_crops"] is None
    empty = detector.process(np.zeros((0, 64, 64, 3), np.uint8), "decode_error")
    assert empty["face_status"] == "decode_error"


def test_batch_call_and_edge_crop(detector: FaceDetector) -> None:
    col = np.empty(2, dtype=object)
    col[0], col[1] = _frames(2, 96, face=True), None
    out = detector({"frames": col, "decode_status": np.array(["ok", "decode_error"], dtype=object)})
    assert list(out["face_status"]) == ["ok", "decode_error"]
    # a box at the border is padded, not shifted: output is still square and the requested size
    crop = square_crop(np.full((50, 50, 3), 7, np.uint8), (40, 40, 10, 10), 0.5, 32)
    assert crop.shape == (32, 32, 3)


def test_cascade_config_errors() -> None:
    assert cascade_path("haarcascade_frontalface_default.xml").endswith(".xml")
    with pytest.raises(FileNotFoundError, match="extract.face.cascade"):
        cascade_path("no_such_cascade.xml")


def test_tracking_finds_the_same_faces_with_one_full_scan_per_clip() -> None:
    """extract.face.track: after the first frame the face is searched near the last one; the boxes are the
    full-frame scan's, the whole frame is scanned once, and a face that jumps away is found by the fallback."""
    frames = np.full((8, 224, 224, 3), 80, np.uint8)
    for t in range(8):  # a speaker drifting right and growing a little, then a cut to the other side
        cx, r = (70 + 6 * t, 40 + t) if t < 6 else (170, 44)
        draw_face(frames[t], cx, 110, r)
    full = FaceDetector(load_config(overrides=["extract.face.track=false"]))
    tracked = FaceDetector(load_config())
    a, b = full.process(frames, "ok"), tracked.process(frames, "ok")
    assert a["face_mask"].all() and b["face_mask"].all()
    assert full.full_scans == 8
    assert tracked.full_scans == 2  # the first frame, and the cut (the window around the old face is empty)
    boxes_a = [full.detect(f) for f in frames]
    last, boxes_b = None, []
    for f in frames:
        last = tracked.detect(f, near=last) or last
        boxes_b.append(last)
    for (xa, ya, wa, ha), (xb, yb, wb, hb) in zip(boxes_a, boxes_b):
        # the window's scale grid starts at a different size than the full scan's: boxes agree to a few pixels
        inter = max(0, min(xa + wa, xb + wb) - max(xa, xb)) * max(0, min(ya + ha, yb + hb) - max(ya, yb))
        assert inter / (wa * ha + wb * hb - inter) >= 0.85, (boxes_a, boxes_b)
