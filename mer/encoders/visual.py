"""Frame encoders: global scene features (CLIP vision) and face-crop features (ViT)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mer.encoders.base import ERROR, BranchEncoder, column, is_missing, to_f32, upstream_status


def _target_hw(processor: Any) -> tuple[tuple[int, int] | None, int | None]:
    """(final height/width, shortest edge before a centre crop) from an image processor's settings."""
    def hw(d: Any) -> tuple[int, int] | None:
        if d is None:
            return None
        if isinstance(d, int):
            return (d, d)
        d = dict(d)
        if "height" in d and "width" in d:
            return (int(d["height"]), int(d["width"]))
        if "shortest_edge" in d:
            return (int(d["shortest_edge"]), int(d["shortest_edge"]))
        return None

    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    shortest = None
    if size is not None and not isinstance(size, int) and "shortest_edge" in dict(size):
        shortest = int(dict(size)["shortest_edge"])
    return (hw(crop) or hw(size)), shortest


class ImageTransform:
    """Batched torch version of the image processor's resize/crop/rescale/normalise.

    Decode already resized frames to ``frame_size``, so this is usually only rescale + normalise; running
    it on whole uint8 tensors avoids the per-image PIL round trip of the (torchvision-less) processors.
    """

    def __init__(self, processor: Any):
        import torch

        (self.hw, self.shortest) = _target_hw(processor)
        self.do_resize = bool(getattr(processor, "do_resize", True))
        self.do_rescale = bool(getattr(processor, "do_rescale", True))
        self.rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        self.do_normalize = bool(getattr(processor, "do_normalize", True))
        mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
        std = getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, frames: np.ndarray, device: str):
        """uint8 [N, H, W, 3] RGB -> float32 [N, 3, h, w] on ``device``."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
        if self.do_resize and self.hw is not None:
            h, w = x.shape[-2:]
            if self.shortest is not None and (h, w) != self.hw:
                scale = self.shortest / min(h, w)
                nh, nw = max(self.hw[0], round(h * scale)), max(self.hw[1], round(w * scale))
                if (nh, nw) != (h, w):
                    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
                top, left = (nh - self.hw[0]) // 2, (nw - self.hw[1]) // 2
                x = x[..., top:top + self.hw[0], left:left + self.hw[1]]
            elif (h, w) != self.hw:
                x = F.interpolate(x, size=self.hw, mode="bicubic", antialias=True, align_corners=False)
        if self.do_rescale:
            x = x * self.rescale
        else:
            x = x / 255.0
        if self.do_normalize:
            x = (x - self.mean.to(device)) / self.std.to(device)
        return x


def _as_frames(v: Any) -> np.ndarray | None:
    """A row's frames as uint8 [T, H, W, 3], or None when absent/malformed."""
    if is_missing(v):
        return None
    a = np.asarray(v)
    if a.ndim == 3 and a.shape[-1] == 3:  # a single frame
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] == 0:
        return None
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


class _FrameEncoder(BranchEncoder):
    """Encode per-row stacks of frames: all frames of the batch go through the model in chunks."""

    # CLS token of the last hidden state (True: the model's pooler output, e.g. CLIP's post-LN CLS).
    use_pooler: ClassVar[bool] = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.transform = ImageTransform(self.processor) if self.processor is not None else None

    def _frame_vectors(self, frames: np.ndarray):
        """float32 [N, D] per-frame vectors for uint8 frames [N, H, W, 3] of one shape."""
        import torch

        vecs = []
        for s in range(0, len(frames), self.chunk):
            x = self.transform(frames[s:s + self.chunk], self.device).to(self.dtype)
            out = self.model(pixel_values=x)
            pooled = getattr(out, "pooler_output", None) if self.use_pooler else None
            vecs.append(pooled if pooled is not None else out.last_hidden_state[:, 0])
        return torch.cat(vecs).float()

    def _encode_stacks(self, stacks: dict[int, np.ndarray], errors: dict[int, str]) -> dict[int, np.ndarray]:
        """Row -> per-frame vectors [T, D]; rows grouped by frame shape so each group is one forward."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for r, a in stacks.items():
            by_shape.setdefault(a.shape[1:], []).append(r)

        def forward(rows: list[int]) -> dict[int, np.ndarray]:
            allf = np.concatenate([stacks[r] for r in rows])
            v = to_f32(self._frame_vectors(allf))
            out, s = {}, 0
            for r in rows:
                t = len(stacks[r])
                out[r] = v[s:s + t]
                s += t
            return out

        result: dict[int, np.ndarray] = {}
        for rows in by_shape.values():
            result.update(self._run_rows(rows, forward, errors))
        return result


class GlobalVisualEncoder(_FrameEncoder):
    """Global scene features: mean over sampled frames of the CLIP vision pooled output."""

    branch = "global_visual"
    use_pooler = True
    input_columns = ("frames", "decode_status")
    output_columns = ("global_visual", "global_visual_status", "global_visual_seq", "global_visual_error")

    def encode(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        frames = column(batch, "frames", n)
        dstat = column(batch, "decode_status", n)
        status = [""] * n
        errors: dict[int, str] = {}
        stacks: dict[int, np.ndarray] = {}
        for i in range(n):
            a = _as_frames(frames[i])
            if a is None:
                status[i] = upstream_status(dstat[i], default="decode_error")
            else:
                stacks[i] = a
        return self.outputs("global_visual", status, self._encode_stacks(stacks, errors), errors)


class FaceEncoder(_FrameEncoder):
    """Face features: mean over the frames where a face was found of the ViT CLS vector."""

    branch = "face"
    use_pooler = False  # ViT's pooler is an untrained head in expression checkpoints; CLS is the feature
    input_columns = ("face_crops", "face_mask", "face_status")
    output_columns = ("face", "face_status", "face_seq", "face_error")

    def encode(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        crops = column(batch, "face_crops", n)
        masks = column(batch, "face_mask", n)
        fstat = column(batch, "face_status", n)
        dstat = column(batch, "decode_status", n)
        status = [""] * n
        errors: dict[int, str] = {}
        stacks: dict[int, np.ndarray] = {}
        for i in range(n):
            a = _as_frames(crops[i])
            if a is None:
                status[i] = upstream_status(dstat[i], fstat[i], default="no_face")
                continue
            if not is_missing(masks[i]):
                m = np.asarray(masks[i], dtype=bool).reshape(-1)
                if len(m) == len(a):
                    a = a[m]
                elif int(m.sum()) != len(a):  # crops must be per frame or per detected face
                    status[i], errors[i] = ERROR, f"face: {len(a)} crops but mask of {len(m)} ({int(m.sum())} faces)"
                    continue
            if len(a) == 0:
                status[i] = upstream_status(fstat[i], default="no_face")
                continue
            stacks[i] = a
        return self.outputs("face", status, self._encode_stacks(stacks, errors), errors)
