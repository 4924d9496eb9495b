"""Helpers of the ``map_batches`` callables (decode, encoders, generators): object columns and row isolation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("mer")


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-shape arrays otherwise)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def isolate_rows(rows: list[int], forward: Callable[[list[int]], dict[int, Any]], errors: dict[int, str],
                 what: str = "") -> dict[int, Any]:
    """``forward(rows)`` -> {row: result}; if the whole call fails, retry row by row so that one bad input only
    costs its own row, whose message (``<what>: <Error>: <text>``) goes to ``errors``, never the batch."""
    try:
        return forward(rows)
    except Exception as e:  # noqa: BLE001 - isolate the failing row below
        if len(rows) == 1:
            errors[rows[0]] = f"{what}: {e.__class__.__name__}: {e}" if what else f"{e.__class__.__name__}: {e}"
            log.warning("%s failed on a row: %s", what or "a batch call", e)
            return {}
        out: dict[int, Any] = {}
        for r in rows:
            out.update(isolate_rows([r], forward, errors, what))
        return out
