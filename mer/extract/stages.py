"""Stage specs of the extraction pipeline: what each ``map_batches`` step reads, writes and asks Ray for.

Every stage declares its input and output columns; :func:`validate_chain` checks at build time that each
stage's inputs are produced upstream, so a mis-wired pipeline fails before any clip is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from mer.config import StageResources
from mer.extract.timing import timed


class PipelineError(ValueError):
    """The stage chain is mis-wired (a stage reads a column nothing upstream produces)."""


@dataclass
class Stage:
    """One step. ``kind``: ``actor`` (callable class, pool of ``concurrency`` actors), ``task`` (function),
    ``dataset`` (a ``Dataset -> Dataset`` callable such as the enrichment stage, applied to manifest rows)."""

    name: str
    fn: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kind: Literal["actor", "task", "dataset"] = "actor"
    optional_inputs: tuple[str, ...] = ()
    resources: StageResources | None = None
    constructor_args: tuple[Any, ...] = ()
    remote_args: dict[str, Any] = field(default_factory=dict)
    batch_format: str = "numpy"

    def apply(self, ds: Any) -> Any:
        """Add this stage to a Ray Dataset (lazy)."""
        if self.kind == "dataset":
            return self.fn(ds)
        r = self.resources or StageResources()
        kwargs: dict[str, Any] = dict(batch_size=r.batch_size, batch_format=self.batch_format,
                                      num_cpus=r.num_cpus, **self.remote_args)
        if r.num_gpus:
            kwargs["num_gpus"] = r.num_gpus
        if self.kind == "actor":
            from ray.data import ActorPoolStrategy

            # More than one call per actor overlaps Ray Data's block fetch/output with the UDF, which itself
            # still runs one batch at a time (enable_true_multi_threading stays off).
            kwargs["compute"] = ActorPoolStrategy(size=r.concurrency,
                                                  max_concurrent_calls_per_actor=r.max_concurrent_calls)
            kwargs["fn_constructor_args"] = self.constructor_args
        return ds.map_batches(self.fn, **kwargs)


def validate_chain(stages: list[Stage], initial: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """Check that every stage's required inputs exist when it runs; returns the final column list."""
    cols = list(dict.fromkeys(initial))
    for s in stages:
        missing = [c for c in s.inputs if c not in cols and c not in s.optional_inputs]
        if missing:
            raise PipelineError(f"stage {s.name!r} needs columns {missing}, which no earlier stage produces "
                                f"(available: {cols})")
        cols += [c for c in s.outputs if c not in cols]
    return cols


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


def encoder_group_stage(branches: list[str], cfg: Any, resources: StageResources, remote_args: dict[str, Any],
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
                 remote_args=remote_args)


def encoder_stage(name: str, cls: type, cfg: Any, resources: StageResources, remote_args: dict[str, Any],
                  optional: tuple[str, ...] = ()) -> Stage:
    """Stage of one branch encoder (``mer.encoders`` callable class with input/output column attributes)."""
    inputs = tuple(getattr(cls, "input_columns", ()))
    outputs = tuple(getattr(cls, "output_columns", ()))
    return Stage(name=name, fn=timed(cls, name), inputs=inputs, outputs=outputs, kind="actor",
                 optional_inputs=optional, resources=resources, constructor_args=(cfg,), remote_args=remote_args)


Fn = Callable[[Any], Any]
