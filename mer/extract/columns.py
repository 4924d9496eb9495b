"""The in-flight representation of missing values that keeps Ray Data blocks concatenable: every stage's output
passes through :func:`normalize_batch` (the timing wrapper calls it, :func:`mer.extract.timing.timed`)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Array columns and their (dtype, ndim): a missing value becomes an EMPTY array of that kind, never None.
# Ray Data cannot concatenate blocks where one holds a tensor column and another the same column as
# Python objects (None), so every block must carry the same representation.
_VECTOR_COLUMNS = ("global_visual", "face", "audio", "text", "text_enriched", "visual_description")
ARRAY_KINDS: dict[str, tuple[Any, int]] = {
    "frames": (np.uint8, 4), "face_crops": (np.uint8, 4), "face_mask": (np.bool_, 1), "audio": (np.float32, 1),
    **{b: (np.float32, 1) for b in _VECTOR_COLUMNS}, **{f"{b}_seq": (np.float32, 2) for b in _VECTOR_COLUMNS},
}


def is_absent(v: Any) -> bool:
    """None or NaN (an empty array is a value here: the kind of an array column)."""
    return v is None or (isinstance(v, float) and v != v)


def normalize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace None in object columns: empty arrays in array columns, "" in string columns."""
    for name, col in list(batch.items()):
        if not isinstance(col, np.ndarray) or col.dtype != object:
            continue
        present = [v for v in col if not is_absent(v)]
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
                out[i] = "" if is_absent(v) else v
        batch[name] = out
    return batch
