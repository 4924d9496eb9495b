"""Extraction stages (:class:`mer.runtime.stream.Stage`): the encoder stage (one per branch, or every branch in one
pool), and the in-flight representation of missing values that keeps Ray Data blocks concatenable. Per-row
timings are :mod:`mer.extract.timing`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.config import Resources
from mer.extract.timing import timed
from mer.runtime.stream import Stage


# Array columns and their (dtype, ndim): a missing value becomes an EMPTY array of that kind, never None.
# Ray Data cannot concatenate blocks where one holds a tensor column and another the same column as
# Python objects (None), so every block must carry the same representation.
_VECTOR_COLUMNS = ("global_visual", "face", "audio", "text", "text_enriched")
ARRAY_KINDS: dict[str, tuple[Any, int]] = {
    "frames": (np.uint8, 4), "face_crops": (np.uint8, 4), "face_mask": (np.bool_, 1), "audio": (np.float32, 1),
    **{b: (np.float32, 1) for b in _VECTOR_COLUMNS}, **{f"{b}_seq": (np.float32, 2) for b in _VECTOR_COLUMNS},
}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def normalize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace None in object columns: empty arrays in array columns, "" in string columns."""
    for name, col in list(batch.items()):
        if not isinstance(col, np.ndarray) or col.dtype != object:
            continue
        present = [v for v in col if not _missing(v)]
        is_array = any(isinstance(v, np.ndarray) for v in present) or (not present and name in ARRAY_KINDS)
        if len(present) == len(col) and not (is_array and any(not isinstance(v, np.ndarray) for v in present)):
            continue
        out = np.empty(len(col), dtype=object)
        if is_array:
            first = next((v for v in present if isinstance(v, np.ndarray)), None)
            dtype, ndim = (first.dtype, first.ndim) if first is not None else ARRAY_KINDS[name]
            empty = np.zeros((0,) * ndim, dtype=dtype)
            for i, v in enumerate(col):
                out[i] = v if isinstance(v, np.ndarray) else empty
        else:
            for i, v in enumerate(col):
                out[i] = "" if _missing(v) else v
        batch[name] = out
    return batch


class EncoderGroup:
    """``map_batches`` callable class running several branch encoders in one actor, one after another.

    Each encoder is wrapped by :func:`timed` under its branch name, so busy times and model-load times stay
    per branch; the group only saves the per-process cost (worker start, torch/transformers imports)."""

    def __init__(self, cfg: Any, branches: tuple[str, ...]):
        from mer.encoders import ENCODERS

        self.encoders = [timed(ENCODERS[b], b)(cfg) for b in branches]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for enc in self.encoders:
            batch = enc(batch)
        return batch


def encoder_group_stage(branches: list[str], cfg: Any, resources: Resources, map_args: dict[str, Any],
                        optional: tuple[str, ...] = ()) -> Stage:
    """One stage (one actor pool) for the encoders of ``branches`` (``extract.encoders.colocated``)."""
    from mer.encoders import ENCODERS

    inputs: list[str] = []
    outputs: list[str] = []
    for b in branches:  # a column an earlier branch of the group produces is not an input of the group
        inputs += [c for c in getattr(ENCODERS[b], "input_columns", ()) if c not in outputs and c not in inputs]
        outputs += [c for c in getattr(ENCODERS[b], "output_columns", ()) if c not in outputs]
    return Stage(name="encoders", fn=EncoderGroup, inputs=tuple(inputs), outputs=tuple(outputs), kind="actor",
                 optional_inputs=optional, resources=resources, constructor_args=(cfg, tuple(branches)),
                 map_args=map_args)


def encoder_stage(name: str, cls: type, cfg: Any, resources: Resources, map_args: dict[str, Any],
                  optional: tuple[str, ...] = ()) -> Stage:
    """Stage of one branch encoder (``mer.encoders`` callable class with input/output column attributes)."""
    inputs = tuple(getattr(cls, "input_columns", ()))
    outputs = tuple(getattr(cls, "output_columns", ()))
    return Stage(name=name, fn=timed(cls, name), inputs=inputs, outputs=outputs, kind="actor",
                 optional_inputs=optional, resources=resources, constructor_args=(cfg,), map_args=map_args)
