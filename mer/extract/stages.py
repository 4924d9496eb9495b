"""Extraction stages (:class:`mer.runtime.stream.Stage`): the encoder stage (one per branch, or every branch in one
pool). Missing values in flight are :mod:`mer.extract.columns`'s, per-row timings :mod:`mer.extract.timing`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.config import Resources
from mer.encoders import ENCODERS
from mer.extract.timing import timed
from mer.runtime.stream import Stage


class EncoderGroup:
    """``map_batches`` callable class running several branch encoders in one actor, one after another.

    Each encoder is wrapped by :func:`timed` under its branch name, so busy times and model-load times stay
    per branch; the group only saves the per-process cost (worker start, torch/transformers imports)."""

    def __init__(self, cfg: Any, branches: tuple[str, ...]):
        self.encoders = [timed(ENCODERS[b], b)(cfg) for b in branches]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for enc in self.encoders:
            batch = enc(batch)
        return batch


def encoder_group_stage(branches: list[str], cfg: Any, resources: Resources, map_args: dict[str, Any],
                        optional: tuple[str, ...] = ()) -> Stage:
    """One stage (one actor pool) for the encoders of ``branches`` (``extract.encoders.colocated``)."""
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
