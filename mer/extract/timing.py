"""Per-stage timings that travel with the rows: busy time, CPU time, batch spans and actor start-up.

:func:`timed` wraps a stage's ``map_batches`` callable class; every output row carries small float
columns (``_t_<stage>`` busy seconds, ``_tc_<stage>`` CPU seconds (``_th_<stage>``: the part its helper processes used, e.g. the decode
child), ``_tb_``/``_te_`` the batch's begin and
end as epoch seconds, and on an actor's first batch ``_tp_``/``_ti_``/``_tr_``: when its process started,
when the class's ``__init__`` began and when it returned). The driver folds them with
:class:`StageTimes` into busy fractions and the parts of the time to the first row, then drops them
(:func:`drop_timing`) before anything is stored.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from mer.extract.columns import normalize_batch

PREFIX = "_t"
BUSY = "_t_"  # seconds of UDF wall time per row
_FIELDS = {"cpu": "_tc_", "helper_cpu": "_th_", "begin": "_tb_", "end": "_te_", "proc": "_tp_", "init": "_ti_",
           "ready": "_tr_", "tokens": "_tk_"}


def is_timing(column: str) -> bool:
    """True for the timing columns :func:`timed` adds."""
    return column.startswith(BUSY) or any(column.startswith(p) for p in _FIELDS.values())


def drop_timing(table: Any) -> Any:
    """A pyarrow table without the timing columns."""
    return table.drop_columns([c for c in table.column_names if is_timing(c)])


def process_start_epoch(pid: int | None = None) -> float:
    """When a process started, as epoch seconds (Linux /proc; NaN when unknown)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return math.nan


def timed(cls: type, key: str) -> type:
    """A subclass of a ``map_batches`` callable class that adds the timing columns of stage ``key`` and
    normalises missing values (:func:`mer.extract.columns.normalize_batch`).

    CPU time is this process's (all threads) plus, when the instance has ``child_cpu_s()``, its helper
    processes' (the decode child). It keeps the class name, so Ray's actor names
    (``MapWorker(<Class>)``) still say which stage it is.
    """
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._timing_start = (process_start_epoch(), time.time())
        cls.__init__(self, *args, **kwargs)
        self._timing_start += (time.time(),)

    def _helper_cpu(self: Any) -> float:
        child = getattr(self, "child_cpu_s", None)
        return child() if child is not None else 0.0

    def __call__(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        begin, t0, c0, h0 = time.time(), time.perf_counter(), time.process_time(), _helper_cpu(self)
        out = normalize_batch(cls.__call__(self, batch))
        n = len(next(iter(out.values()))) if out else 0
        per_row = 1.0 / max(1, n)
        helper = _helper_cpu(self) - h0
        out[f"{BUSY}{key}"] = np.full(n, (time.perf_counter() - t0) * per_row)
        out[f"{_FIELDS['cpu']}{key}"] = np.full(n, (time.process_time() - c0 + helper) * per_row)
        out[f"{_FIELDS['helper_cpu']}{key}"] = np.full(n, helper * per_row)
        out[f"{_FIELDS['begin']}{key}"] = np.full(n, begin)
        out[f"{_FIELDS['end']}{key}"] = np.full(n, time.time())
        # a generation stage says how many tokens this call generated (``batch_tokens``)
        out[f"{_FIELDS['tokens']}{key}"] = np.full(n, getattr(self, "batch_tokens", 0) * per_row)
        start = self.__dict__.pop("_timing_start", None)  # reported once, with the actor's first batch
        for name, value in zip(("proc", "init", "ready"), start or (math.nan,) * 3):
            out[f"{_FIELDS[name]}{key}"] = np.full(n, value)
        return out

    return type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__,
                                       "__qualname__": cls.__qualname__})


def _steady(batch_ends: dict[float, tuple[int, float, float]]) -> dict[str, float | None]:
    """A stage's own steady rate and CPU ms per row (all, and its helper processes'): the batches after its
    first, over the time from the first batch's end to the last's (start-up excluded, and independent of
    how fast the driver drains the stream)."""
    if len(batch_ends) < 2:
        return {"steady_rows_per_s": None, "steady_cpu_ms_per_row": None, "steady_helper_cpu_ms_per_row": None}
    ends = sorted(batch_ends)
    rows = sum(batch_ends[t][0] for t in ends[1:])
    cpu = sum(batch_ends[t][1] for t in ends[1:])
    helper = sum(batch_ends[t][2] for t in ends[1:])
    return {"steady_rows_per_s": round(rows / max(1e-9, ends[-1] - ends[0]), 3),
            "steady_cpu_ms_per_row": round(1000 * cpu / max(1, rows), 2),
            "steady_helper_cpu_ms_per_row": round(1000 * helper / max(1, rows), 2)}


class StageTimes:
    """Folds the timing columns of the batches a driver receives into per-stage figures."""

    def __init__(self, t0: float):
        self.t0 = t0  # epoch seconds when the stream started executing
        self.rows = 0
        self.first_row_at: float | None = None
        self.last_row_at: float | None = None
        self.stages: dict[str, dict[str, Any]] = {}

    def add(self, table: Any) -> None:
        """One received batch (pyarrow table with the timing columns)."""
        now = time.time()
        if table.num_rows and self.first_row_at is None:
            self.first_row_at = now
        self.last_row_at = now
        self.rows += table.num_rows
        cols = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                for c in table.column_names if is_timing(c)}
        for c, v in cols.items():
            if not c.startswith(BUSY):
                continue
            key = c[len(BUSY):]
            s = self.stages.setdefault(key, {"busy_s": 0.0, "cpu_s": 0.0, "tokens": 0.0, "begin": math.inf,
                                              "end": -math.inf, "actors": set(), "batch_ends": {}})
            s["busy_s"] += float(np.nansum(v))
            s["tokens"] += float(np.nansum(cols.get(f"{_FIELDS['tokens']}{key}", 0.0)))
            s["cpu_s"] += float(np.nansum(cols.get(f"{_FIELDS['cpu']}{key}", 0.0)))
            b, e = cols.get(f"{_FIELDS['begin']}{key}"), cols.get(f"{_FIELDS['end']}{key}")
            if b is not None and np.isfinite(b).any():
                s["begin"] = min(s["begin"], float(np.nanmin(b)))
            if e is not None and np.isfinite(e).any():
                s["end"] = max(s["end"], float(np.nanmax(e)))
                # rows and CPU per batch, keyed by its end time (a batch's rows share it; they may reach the
                # driver in more than one piece)
                c = cols.get(f"{_FIELDS['cpu']}{key}", np.zeros(len(e)))
                h = cols.get(f"{_FIELDS['helper_cpu']}{key}", np.zeros(len(e)))
                for t in np.unique(e[np.isfinite(e)]):
                    rows, cpu, helper = s["batch_ends"].get(float(t), (0, 0.0, 0.0))
                    s["batch_ends"][float(t)] = (rows + int((e == t).sum()), cpu + float(np.nansum(c[e == t])),
                                                 helper + float(np.nansum(h[e == t])))
            starts = [cols.get(f"{_FIELDS[k]}{key}") for k in ("proc", "init", "ready")]
            if all(x is not None for x in starts):
                for p, i, r in zip(*starts):
                    if np.isfinite(i):
                        s["actors"].add((float(p), float(i), float(r)))

    def summary(self, concurrency: dict[str, int] | None = None) -> dict[str, Any]:
        """Per stage: busy and CPU ms per row, busy fraction of the run (busy / (actors × run time)),
        actor start-up; and the time to the first row split into its parts."""
        end = self.last_row_at or time.time()
        run_s = max(1e-9, end - self.t0)
        rows = max(1, self.rows)
        stages: dict[str, Any] = {}
        for key, s in self.stages.items():
            actors = sorted(s["actors"])
            n_actors = (concurrency or {}).get(key) or max(1, len(actors))
            stages[key] = {
                **_steady(s["batch_ends"]),
                "busy_ms_per_row": round(1000 * s["busy_s"] / rows, 2),
                "cpu_ms_per_row": round(1000 * s["cpu_s"] / rows, 2),
                "busy_fraction": round(s["busy_s"] / (n_actors * run_s), 4),
                "tokens": round(s["tokens"]),
                # generated tokens per second the stage was busy (its own rate, start-up excluded)
                "tokens_per_busy_s": round(s["tokens"] / s["busy_s"], 1) if s["busy_s"] > 0 else 0.0,
                "first_batch_at_s": round(s["begin"] - self.t0, 2) if math.isfinite(s["begin"]) else None,
                "actors": [{"process_started_s": round(p - self.t0, 2), "init_s": round(r - i, 2),
                            "ready_s": round(r - self.t0, 2)} for p, i, r in actors],
            }
        first = None
        if self.first_row_at is not None:
            ready = [(a["ready_s"], k, a) for k, v in stages.items() for a in v["actors"]]
            first = {"seconds": round(self.first_row_at - self.t0, 2)}
            if ready:
                last_ready, key, a = max(ready, key=lambda x: x[0])
                first.update({
                    "last_actor_ready_s": last_ready, "last_actor_stage": key,
                    # worker process spawn (Ray queues the starts), then imports, then __init__ (model load)
                    "its_process_started_s": a["process_started_s"],
                    "its_imports_s": round(last_ready - a["init_s"] - a["process_started_s"], 2),
                    "its_init_s": a["init_s"],
                    "max_init_s": max(x[2]["init_s"] for x in ready),
                    "after_all_ready_s": round(first["seconds"] - last_ready, 2),
                })
        return {"rows": self.rows, "run_s": round(run_s, 2), "first_row": first, "stages": stages}
