"""Extraction stages (:class:`mer.stream.Stage`): the encoder stage, per-row busy time, and the in-flight
representation of missing values that keeps Ray Data blocks concatenable.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mer.config import Resources
from mer.stream import Stage


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


def timed(cls: type, key: str) -> type:
    """A subclass of a ``map_batches`` callable class that adds per-row busy time ``_t_<key>`` (seconds)
    and normalises missing values (:func:`normalize_batch`).

    It keeps the class name, so Ray's actor names (``MapWorker(<Class>)``) still say which stage it is.
    """

    def __call__(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = normalize_batch(cls.__call__(self, batch))
        n = len(next(iter(out.values()))) if out else 0
        out[f"_t_{key}"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__qualname__": cls.__qualname__})


def encoder_stage(name: str, cls: type, cfg: Any, resources: Resources, map_args: dict[str, Any],
                  optional: tuple[str, ...] = ()) -> Stage:
    """Stage of one branch encoder (``mer.encoders`` callable class with input/output column attributes)."""
    inputs = tuple(getattr(cls, "input_columns", ()))
    outputs = tuple(getattr(cls, "output_columns", ()))
    return Stage(name=name, fn=timed(cls, name), inputs=inputs, outputs=outputs, kind="actor",
                 optional_inputs=optional, resources=resources, constructor_args=(cfg,), map_args=map_args)
