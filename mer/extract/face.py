"""Face stage: detect the largest face per sampled frame, crop it square with a margin, align, resize.

The detector is OpenCV's Haar cascade (``extract.face.cascade``: a file name inside the cascades bundled
with opencv-python, or a path), loaded once per actor. With ``extract.face.track`` the first face of a clip
is found by a full-frame scan and each later frame is searched in a window around the last face, at sizes
near it, falling back to the full frame when the window has none (most of the stage's CPU was the full
multi-scale scan of every frame). Alignment is a similarity normalisation: the crop
is centred on the face box and scaled so the face fills the same fraction of every crop.

Per-row outputs: ``face_crops`` (uint8 [T, c, c, 3], zeros where no face, or None), ``face_mask`` (bool [T]
or None), ``face_status`` (``ok``, ``no_face``, or the decode failure), ``face_detect_error``. A clip without any
face gets ``no_face`` and None crops: the face vector is then null and masked in fusion.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mer.config import FaceConfig, MerConfig

OK = "ok"
NO_FACE = "no_face"


def cascade_path(name: str) -> str:
    """Resolve a cascade name: an existing path, else a file among OpenCV's bundled cascades."""
    if os.path.isfile(name):
        return name
    import cv2

    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if base and os.path.isfile(os.path.join(base, name)):
        return os.path.join(base, name)
    raise FileNotFoundError(
        f"extract.face.cascade: {name!r} is neither a file nor a cascade bundled with OpenCV "
        f"({base or 'this OpenCV build ships none: opencv-python-headless<5 does'})")


def square_crop(frame: np.ndarray, box: tuple[int, int, int, int], margin: float, size: int) -> np.ndarray:
    """Square crop centred on ``box`` (x, y, w, h) enlarged by ``margin`` per side, edge-padded, resized."""
    import cv2

    x, y, w, h = box
    cx, cy = x + w / 2.0, y + h / 2.0
    half = max(w, h) * (0.5 + margin)
    x0, y0 = int(round(cx - half)), int(round(cy - half))
    x1, y1 = int(round(cx + half)), int(round(cy + half))
    H, W = frame.shape[:2]
    pad = max(0, -x0, -y0, x1 - W, y1 - H)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    crop = frame[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


class FaceDetector:
    """``map_batches`` callable class: frames → largest-face crops, per-frame mask and status."""

    input_columns = ("frames", "decode_status")
    optional_inputs: tuple[str, ...] = ()
    output_columns = ("face_crops", "face_mask", "face_status", "face_detect_error")

    def __init__(self, cfg: MerConfig | FaceConfig):
        import cv2

        fc = cfg.extract.face if isinstance(cfg, MerConfig) else cfg
        self.fc = fc
        self.cascade = cv2.CascadeClassifier(cascade_path(fc.cascade))
        if self.cascade.empty():
            raise ValueError(f"extract.face.cascade: OpenCV could not load {fc.cascade!r}")
        cv2.setNumThreads(1)  # one CPU per stage actor, as requested from Ray
        self.full_scans = 0  # whole-frame scans (the tracking windows' are the cheap ones)

    def _gray(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Equalised grey frame for the cascade, upscaled when small (its window is 24 px), and the scale."""
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        up = max(1.0, self.fc.detect_min_size / max(1, min(gray.shape)))
        if up > 1.0:
            gray = cv2.resize(gray, None, fx=up, fy=up, interpolation=cv2.INTER_LINEAR)
        return gray, up

    def _min_side(self, gray: np.ndarray) -> int:
        """Smallest face side searched in ``gray``: ``min_face_frac`` of the frame, never below the 24 px window."""
        return max(24, int(self.fc.min_face_frac * min(gray.shape)))

    def _scan(self, gray: np.ndarray, min_px: int, max_px: int | None = None) -> tuple[int, int, int, int] | None:
        """Largest box the cascade finds in ``gray`` with sides in [min_px, max_px]."""
        kwargs = {"maxSize": (max_px, max_px)} if max_px else {}
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=self.fc.scale_factor,
                                              minNeighbors=self.fc.min_neighbors, minSize=(min_px, min_px), **kwargs)
        if len(boxes) == 0:
            return None
        x, y, w, h = max(boxes, key=lambda b: int(b[2]) * int(b[3]))
        return int(x), int(y), int(w), int(h)

    def _near(self, gray: np.ndarray, prev: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        """The face near ``prev`` (a box in ``gray``'s pixels): a window around it, sizes close to it."""
        x, y, w, h = prev
        side = max(w, h)
        pad = int(round(side * self.fc.track_margin))
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(gray.shape[1], x + w + pad), min(gray.shape[0], y + h + pad)
        lo = max(self._min_side(gray), int(side / self.fc.track_scale))
        hi = int(side * self.fc.track_scale) + 1
        if x1 - x0 < lo or y1 - y0 < lo:
            return None
        box = self._scan(gray[y0:y1, x0:x1], lo, hi)
        return None if box is None else (box[0] + x0, box[1] + y0, box[2], box[3])

    def detect(self, frame: np.ndarray, near: tuple[int, int, int, int] | None = None
               ) -> tuple[int, int, int, int] | None:
        """Largest face box (x, y, w, h) in an RGB frame, or None. ``near``: a box of the previous frame (in
        this frame's pixels): searched around it first, the whole frame only when that finds nothing."""
        gray, up = self._gray(frame)
        box = None
        if near is not None:
            box = self._near(gray, tuple(int(round(v * up)) for v in near))  # type: ignore[arg-type]
        if box is None:
            self.full_scans += 1
            box = self._scan(gray, self._min_side(gray))
        if box is None:
            return None
        x, y, w, h = box
        return int(x / up), int(y / up), max(1, int(w / up)), max(1, int(h / up))

    def process(self, frames: Any, decode_status: Any) -> dict[str, Any]:
        """One row: crops [T, c, c, 3] (zeros where no face), mask [T], status."""
        if frames is None or not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.size == 0:
            up = decode_status if isinstance(decode_status, str) and decode_status != OK else "decode_error"
            return {"face_crops": None, "face_mask": None, "face_status": up, "face_detect_error": None}
        c = self.fc.crop_size
        crops = np.zeros((len(frames), c, c, 3), dtype=np.uint8)
        mask = np.zeros(len(frames), dtype=bool)
        last = None
        for t, f in enumerate(frames):
            box = self.detect(np.ascontiguousarray(f), near=last if self.fc.track else None)
            last = box or last
            if box is not None:
                crops[t] = square_crop(f, box, self.fc.margin, c)
                mask[t] = True
        if not mask.any():
            return {"face_crops": None, "face_mask": mask, "face_status": NO_FACE,
                    "face_detect_error": f"no face in {len(frames)} sampled frames"}
        return {"face_crops": crops, "face_mask": mask, "face_status": OK, "face_detect_error": None}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["frames"])
        statuses = batch.get("decode_status", [None] * n)
        rows = [self.process(batch["frames"][i], statuses[i]) for i in range(n)]
        out = dict(batch)
        for name in self.output_columns:
            col = np.empty(n, dtype=object)
            for i, r in enumerate(rows):
                col[i] = r[name]
            out[name] = col
        return out
