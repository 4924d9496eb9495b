"""A stream that stops moving says so.

Ray Data waits for resources without a deadline: an actor pool that cannot be placed (another job holds the
CPUs, a stage asks for more than any node has, a node gone for good) keeps a stream ``pending`` for ever, and a
task starved of CPU by the pools around it does too. The driver consumes every stream of mer (extraction,
scoring, enrichment) through :func:`watched`, which hands the batches over from a thread so the driver can look
at the stream while none arrives: when no batch arrives and no actor of the job changes state for
``ray.stall_timeout_s`` while none of them is starting up (a constructor loading weights is start-up, not a
stall; a start-up that takes four times the limit is one), the stream is stalled. On a fixed cluster that raises
:class:`StreamStalled` with a table of the job's pools (each operator's actors alive / starting / waiting for
resources, what one asks, what the cluster has and has free); on an autoscaling cluster the table is logged
every interval and the stream keeps waiting for nodes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mer.config import MerConfig
from mer.runtime.placement import autoscaling

log = logging.getLogger("mer.stall")
T = TypeVar("T")

# A start-up (an actor placed, its constructor running) longer than this many stall limits is a stall itself.
STARTUP_LIMIT_FACTOR = 4.0


class StreamStalled(RuntimeError):
    """A stream made no progress for the stall time on a cluster that cannot grow."""


@dataclass(frozen=True)
class PoolState:
    """The actors of one Ray Data operator of this job, by state."""

    name: str
    asks: dict[str, float]
    alive: int = 0
    starting: int = 0
    waiting: int = 0  # not placed: no worker process yet, waiting for resources

    def row(self) -> str:
        asks = ", ".join(f"{v:g} {k}" for k, v in sorted(self.asks.items()) if v) or "nothing"
        counts = f"{self.alive} alive, {self.starting} starting, " if self.name.startswith("MapWorker(") else ""
        return f"  {self.name}: {counts}{self.waiting} waiting for resources; each asks {asks}"


def pool_states(job_id: str | None = None) -> list[PoolState] | None:
    """The Ray Data actor pools (and the LLM engine) of this job by operator, and its tasks waiting for
    resources, from Ray's state API; ``None`` when the state API does not answer (no dashboard)."""
    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    job_id = job_id or context.get_job_id()
    try:
        # the connected cluster's address: without it the state API looks for one and gives up where a machine
        # runs several Ray instances
        actors = list_actors(address=context.gcs_address, filters=[("job_id", "=", job_id)], detail=True,
                             limit=10_000, raise_on_missing_output=False, timeout=10)
    except Exception as e:  # noqa: BLE001 - the state API is optional (a cluster without its dashboard)
        log.debug("state API unavailable: %s", e)
        return None
    pools: dict[str, dict[str, Any]] = {}
    for a in actors:
        name = str(getattr(a, "class_name", "") or "")
        state = str(getattr(a, "state", "") or "")
        if not name.startswith("MapWorker(") or state == "DEAD":
            continue
        p = pools.setdefault(name, {"asks": dict(getattr(a, "required_resources", None) or {}), "alive": 0,
                                    "starting": 0, "waiting": 0})
        if state == "ALIVE":
            p["alive"] += 1
        elif state == "RESTARTING" or (getattr(a, "pid", 0) or 0) > 0:
            p["starting"] += 1  # a worker process runs its constructor
        else:
            p["waiting"] += 1
    out = [PoolState(name=n, asks={k: float(v) for k, v in p.pop("asks").items()}, **p)
           for n, p in sorted(pools.items())]
    return out + _waiting_tasks(context.gcs_address, job_id)


def _waiting_tasks(address: str, job_id: str) -> list[PoolState]:
    """This job's tasks that wait for a node with the resources they ask (Ray Data's read, metadata and map
    tasks), by function, as pools of waiting units."""
    from ray.util.state import list_tasks

    try:
        tasks = list_tasks(address=address, filters=[("job_id", "=", job_id),
                                                     ("state", "=", "PENDING_NODE_ASSIGNMENT")],
                           detail=True, limit=10_000, raise_on_missing_output=False, timeout=10)
    except Exception as e:  # noqa: BLE001 - as for the actors
        log.debug("state API unavailable for tasks: %s", e)
        return []
    waiting: dict[str, dict[str, Any]] = {}
    for t in tasks:
        if str(getattr(t, "type", "")) != "NORMAL_TASK":
            continue
        name = f"task {getattr(t, 'func_or_class_name', None) or getattr(t, 'name', '?')}"
        w = waiting.setdefault(name, {"asks": dict(getattr(t, "required_resources", None) or {}), "n": 0})
        w["n"] += 1
    return [PoolState(name=n, asks={k: float(v) for k, v in w["asks"].items()}, waiting=w["n"])
            for n, w in sorted(waiting.items())]


def describe(what: str, pools: list[PoolState] | None, quiet_s: float) -> str:
    """The stall message: what stalled, the job's pools and the cluster's resources."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()

    def res(d: dict[str, float]) -> str:
        return f"{d.get('CPU', 0.0):g} CPU, {d.get('GPU', 0.0):g} GPU"

    lines = [f"{what} made no progress for {quiet_s:.0f} s (no row, no actor started or finished starting):"]
    if pools is None:
        lines.append("  (Ray's state API did not answer: the pools' placement is unknown)")
    elif not pools:
        lines.append("  no actor pool of this job is alive or pending")
    else:
        lines += [p.row() for p in pools]
    lines.append(f"  the cluster has {res(total)}; free now {res(free)}")
    waiting = [p.name for p in pools or [] if p.waiting]
    if waiting:
        lines.append(f"  waiting for resources: {', '.join(waiting)} — free what holds them (another job?), lower "
                     "their resources (--set KEY=VALUE), add nodes, or set ray.autoscaler=true on a cluster that "
                     "grows")
    elif pools:
        lines.append("  every pool is placed: Ray Data's tasks may have no CPU left between the pools (lower the "
                     "pools' num_cpus), or a stage is stuck inside its batch")
    return "\n".join(lines)


@dataclass
class StallWatch:
    """When a stream counts as stalled (``timeout_s`` of no progress; 0 = never) and what then happens
    (``autoscaler``: log and keep waiting; else raise :class:`StreamStalled`)."""

    what: str
    timeout_s: float
    poll_s: float = 10.0
    autoscaler: bool = False
    probe: Callable[[], list[PoolState] | None] = pool_states
    _last_progress: float = field(default_factory=time.monotonic)
    _last_start: float = field(default_factory=time.monotonic)
    _snapshot: Any = None

    @classmethod
    def from_config(cls, cfg: MerConfig, what: str) -> StallWatch:
        """The watch ``ray.stall_timeout_s`` / ``ray.stall_poll_s`` ask for, under this process's placement policy
        (a joined cluster that autoscales waits)."""
        return cls(what=what, timeout_s=cfg.ray.stall_timeout_s, poll_s=min(cfg.ray.stall_poll_s,
                   max(cfg.ray.stall_timeout_s / 4, 0.5)) if cfg.ray.stall_timeout_s else cfg.ray.stall_poll_s,
                   autoscaler=autoscaling())

    def progressed(self) -> None:
        """A row arrived."""
        self._last_progress = self._last_start = time.monotonic()

    def check(self) -> None:
        """Called while no row arrives: log or raise when the stream is stalled."""
        if not self.timeout_s:
            return
        now = time.monotonic()
        pools = self.probe()
        snapshot = None if pools is None else tuple((p.name, p.alive, p.starting, p.waiting) for p in pools)
        if snapshot is not None and snapshot != self._snapshot:
            # an actor was placed, started or came up: a stage moved
            if self._snapshot is not None:
                self._last_progress = now
            self._snapshot = snapshot
        starting = any(p.starting for p in pools or [])
        if not starting:
            self._last_start = now
        quiet = now - self._last_progress
        if starting and now - self._last_start < STARTUP_LIMIT_FACTOR * self.timeout_s:
            return
        if quiet < self.timeout_s:
            return
        message = describe(self.what, pools, quiet)
        if self.autoscaler:
            log.warning("%s\n  ray.autoscaler is true: waiting for the cluster to add nodes", message)
            self._last_progress = now
            return
        raise StreamStalled(message)


_END = object()


def watched(source: Callable[[], Iterable[T]], watch: StallWatch | None) -> Iterator[T]:
    """The items of ``source()``, produced in a thread so that ``watch`` can look at the stream while none
    arrives (without a watch, or with timeout 0, the items are simply yielded). The producer's errors are
    raised here as they are (a stream restart needs Ray's own error types); when the consumer stops early, the
    producer stops at its next item and closes ``source()``'s iterator (which shuts a Ray Data stream down)."""
    if watch is None or not watch.timeout_s:
        yield from source()
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source():
                while not stop.is_set():
                    try:
                        handoff.put((item, None), timeout=1.0)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            handoff.put((_END, e))

    thread = threading.Thread(target=produce, name=f"mer-stream {watch.what}"[:60], daemon=True)
    watch.progressed()
    thread.start()
    try:
        while True:
            try:
                item, error = handoff.get(timeout=watch.poll_s)
            except queue.Empty:
                watch.check()
                continue
            if error is not None:
                raise error
            if item is _END:
                return
            watch.progressed()
            yield item
            watch.progressed()  # the consumer's own time (committing a part) is not the stream's
    finally:
        stop.set()
