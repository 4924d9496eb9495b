"""Ray Data streams: stages declared once and turned into ``map_batches`` calls, and the one resume-and-commit
loop that writes a stream into a part store.

Extraction (decode → face → encoders), scoring (from a feature store or from videos, and the label loop's pool
scores) and enrichment (prompts → generation → finalize) are chains of :class:`Stage`: what each reads and
writes, and its :class:`~mer.config.Resources`, which alone give Ray its arguments. :func:`build` checks the
chain's columns before anything runs. :func:`write_stream` is how extraction and scoring write their output: it
skips the keys the part store already holds (resume) and commits parts on the driver as batches arrive
(exactly once, :mod:`mer.store.parts`). When Ray loses what a stream runs on for good (its own actor restarts and
task retries spent, a node gone), :func:`with_restarts` starts the stream again over the keys not yet
committed, a bounded number of times; errors of the code or the input are never retried.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pyarrow as pa

from mer.config import Resources
from mer.runtime.console import Progress, tame_libraries
from mer.runtime.placement import ensure_placeable, stage_demands
from mer.store.parts import PartStore, PartWriter
from mer.runtime.stall import StallWatch, watched

log = logging.getLogger("mer.stream")
T = TypeVar("T")


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
    tame_libraries()  # stage modules imported just now (ray.data.llm, vLLM) may have added console handlers
    validate_chain(stages, initial)
    ensure_placeable("the stream " + " -> ".join(s.name for s in stages), stage_demands(stages))
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
    restarts: int = 0  # times the stream was started again after Ray lost what it ran on


def restartable(error: BaseException) -> bool:
    """Whether a stream that raised ``error`` is worth starting again: Ray lost something it ran on (an actor
    or worker whose restarts/retries are spent, a node, an object). Not an error of the code or the input
    (a map function's exception, a bad config, a ``ValueError`` on the driver): a restart would repeat it."""
    from ray.exceptions import (AuthenticationError, RayError, RayTaskError, RuntimeEnvSetupError,
                                TaskCancelledError, UserCodeException)

    if isinstance(error, (UserCodeException, AuthenticationError, RuntimeEnvSetupError, TaskCancelledError)):
        return False
    if isinstance(error, RayTaskError):  # a task's own exception: restartable only if Ray's, not the code's
        return isinstance(error.cause, BaseException) and restartable(error.cause)
    return isinstance(error, RayError)


def with_restarts(attempt: Callable[[], T], restarts: int, what: str) -> T:
    """``attempt()``, called again (at most ``restarts`` more times, one warning each) while it fails with a
    :func:`restartable` error. ``attempt`` must resume: skip what an earlier attempt already committed."""
    for n in range(restarts + 1):
        try:
            return attempt()
        except Exception as e:
            if n == restarts or not restartable(e):
                raise
            log.warning("%s aborted (%s); restarting it over what is not yet committed (restart %d of %d)",
                        what, _summary(e), n + 1, restarts)
    raise AssertionError("unreachable")


def _summary(error: BaseException) -> str:
    """``Type: first line`` of what went wrong (a task error's cause, without Ray's colour codes)."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def write_stream(out: str | PartStore, schema: pa.Schema, rows_per_part: int, wanted: list[str],
                 stream: Callable[[list[str]], Any],
                 on_batch: Callable[[pa.Table], pa.Table] | None = None, *, label: str = "",
                 restarts: int = 0, watch: StallWatch | None = None) -> StreamResult:
    """Write one row per key of ``wanted`` into the part store ``out``: keys already committed are skipped
    (resume; read once, before the stream starts: an open :class:`~mer.store.parts.PartStore` shares the listing
    its caller made); ``stream(pending_keys)`` builds the Ray Dataset of the others, whose batches the driver
    commits as parts of ``rows_per_part`` rows (after ``on_batch``, which may collect figures or add columns);
    ``stream`` may instead return an iterable of Arrow batches made on the driver (a small input: no Ray job).
    A stream that Ray aborts is built again over the keys not yet committed, at most ``restarts`` times
    (:func:`with_restarts`); every key still gets exactly one row. With ``label``, a progress line on the
    console (:class:`mer.runtime.console.Progress`). ``watch``: what to do when the stream stops moving
    (:mod:`mer.runtime.stall`: fail with the pools' placement on a fixed cluster, log it on one that autoscales)."""
    store = PartStore.of(out)
    out_uri = store.uri
    done = store.ids()
    writer = PartWriter(out_uri, schema, rows_per_part, already=done)
    result = StreamResult(wanted=len(wanted), already=sum(k in done for k in wanted), writer=writer)
    n_pending = result.wanted - result.already
    progress = Progress(label, n_pending) if label and n_pending else None
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        # Rows an aborted attempt received are complete: commit them, then stream only what is left.
        writer.flush()
        pending = [k for k in wanted if k not in writer.seen]
        if not pending:
            return
        result.restarts, attempts = attempts, attempts + 1
        def batches() -> Any:
            # Building the stream runs Ray tasks too (from_arrow's metadata, a store's listing): it is watched.
            made = stream(pending)
            if not hasattr(made, "iter_batches"):  # batches made on the driver (a small input, no Ray job)
                return iter(made)
            result.dataset = made
            return made.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1)

        for batch in watched(batches, watch):
            writer.add(on_batch(batch) if on_batch else batch)
            if progress:
                progress.update(batch.num_rows)
        writer.flush()

    with_restarts(attempt, restarts, f"stream into {out_uri}")
    if progress:
        progress.close()
    return result
