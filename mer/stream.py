"""Ray Data streams: stages declared once and turned into ``map_batches`` calls, and the one resume-and-commit
loop that writes a stream into a part store.

Extraction (decode → face → encoders), scoring (from a feature store or from videos, and the label loop's pool
scores) and enrichment (prompts → generation → finalize) are chains of :class:`Stage`: what each reads and
writes, and its :class:`~mer.config.Resources`, which alone give Ray its arguments. :func:`build` checks the
chain's columns before anything runs. :func:`write_stream` is how extraction and scoring write their output: it
skips the keys the part store already holds (resume) and commits parts on the driver as batches arrive
(exactly once, :mod:`mer.parts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from mer.config import Resources
from mer.parts import PartWriter, stored_ids


class PipelineError(ValueError):
    """The stage chain is mis-wired (a stage reads a column nothing upstream produces)."""


@dataclass
class Stage:
    """One step. ``kind``: ``actor`` (callable class, a pool of ``resources.concurrency`` actors), ``task``
    (function), ``dataset`` (a ``Dataset -> Dataset`` callable such as the vLLM processor, applied as it is).
    ``map_args`` are further ``map_batches`` keyword arguments (fault tolerance, ``batch_size=None`` …),
    applied last."""

    name: str
    fn: Any
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    kind: Literal["actor", "task", "dataset"] = "actor"
    optional_inputs: tuple[str, ...] = ()
    resources: Resources | None = None
    constructor_args: tuple[Any, ...] = ()
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    map_args: dict[str, Any] = field(default_factory=dict)
    batch_format: str = "numpy"

    def apply(self, ds: Any) -> Any:
        """Add this stage to a Ray Dataset (lazy)."""
        if self.kind == "dataset":
            return self.fn(ds)
        kwargs: dict[str, Any] = {"batch_format": self.batch_format,
                                  **(self.resources or Resources()).map_batches_args(actors=self.kind == "actor")}
        if self.kind == "actor":
            kwargs.update(fn_constructor_args=self.constructor_args, fn_constructor_kwargs=self.constructor_kwargs)
        if self.fn_kwargs:
            kwargs["fn_kwargs"] = self.fn_kwargs
        kwargs.update(self.map_args)
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


def build(ds: Any, stages: list[Stage], initial: list[str] | tuple[str, ...]) -> Any:
    """``ds`` (with the ``initial`` columns) through ``stages``, the chain checked first (lazy)."""
    validate_chain(stages, initial)
    for s in stages:
        ds = s.apply(ds)
    return ds


@dataclass
class StreamResult:
    """What :func:`write_stream` did: keys wanted, already stored, and the writer (rows, parts, duplicates)."""

    wanted: int
    already: int
    writer: PartWriter
    dataset: Any = None


def write_stream(out_uri: str, schema: pa.Schema, rows_per_part: int, wanted: list[str],
                 stream: Callable[[list[str]], Any],
                 on_batch: Callable[[pa.Table], pa.Table] | None = None) -> StreamResult:
    """Write one row per key of ``wanted`` into the part store ``out_uri``: keys already committed are skipped
    (resume); ``stream(pending_keys)`` builds the Ray Dataset of the others, whose batches the driver commits
    as parts of ``rows_per_part`` rows (after ``on_batch``, which may collect figures or add columns)."""
    done = stored_ids(out_uri)
    pending = [k for k in wanted if k not in done]
    writer = PartWriter(out_uri, schema, rows_per_part, already=done)
    result = StreamResult(wanted=len(wanted), already=len(wanted) - len(pending), writer=writer)
    if pending:
        result.dataset = stream(pending)
        for batch in result.dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
            writer.add(on_batch(batch) if on_batch else batch)
        writer.flush()
    return result
