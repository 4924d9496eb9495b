"""A fit service: Ray Train worker groups that stay up for a whole job and train the fits handed to them over time.

A training job that fits many models one stage after another (the label loop's sources, refinement and rounds; a
tuning study's trials; an ablation; the runs of a benchmark) would otherwise start a ``TorchTrainer`` — controller,
worker processes, process group, imports, DeepSpeed engine, data hand-over — for every run: 8-11 s on a 2-core
machine for runs whose folds compute for about a second each (docs/results.md, ``mer bench train``).

:class:`FitService` starts ``groups`` ``TorchTrainer`` runs whose training function
(:func:`mer.train.worker.service_loop_per_worker`) takes requests from one ``ray.util.queue.Queue``; each request is
one fit (a run's fold, :func:`mer.train.fold.fit_spec`) and is answered on its client's own queue. Ray Train still
owns placement, the process group, restarts (``FailureConfig``: a restarted group continues the request in its
checkpoint) and checkpoints; the queue only says what to train next, so the groups share the work of any number of
clients (driver threads, Tune trials in other processes) in the order it arrives.

:func:`fit_service` opens one for a block of code; :func:`mer.train.run.train_runs` inside it hands its fits to the
service instead of starting worker groups (a small store only: the workers read its rows themselves and keep
them; a store too large for ``train.driver_rows_mb``, or a run with Ray Train callbacks, trains as before). A run
trained through the service writes the same run directory, to the bit (tests/test_train_service.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq

from mer.config import MerConfig
from mer.store import storage
from mer.store.parts import PartStore
from mer.train.features import fits_in_mb, modality_dims, scored_on_driver
from mer.train.fold import controller_poll_interval, ray_storage
from mer.train.worker import SERVICE_STOP, service_loop_per_worker

log = logging.getLogger("mer.train")

Result = dict[str, Any]  # per fit: state, best (bytes), val_pred (table), checkpoint_path, group_timing


class ServiceError(RuntimeError):
    """The fit service stopped (a worker group failed beyond ``train.max_failures``, or it was closed)."""


class FitService:
    """``groups`` warm worker groups (each ``train.resources``: ``concurrency`` workers) that train requests from one
    queue until :meth:`close`. Groups start at :meth:`start` (or at the first request) and hold their resources until
    :meth:`close`; their checkpoints go under ``where``, a folder of the job's own, removed at close (every
    answered fit's outputs are the client's by then; a killed job's service left its checkpoints there too).
    ``callbacks``: Ray Train ``UserCallback``s of every group's controller (tests inject worker failures with one)."""

    def __init__(self, cfg: MerConfig, where: str, *, groups: int = 1, callbacks: list[Any] | None = None,
                 idle_s: float = 5.0) -> None:
        self.cfg, self.where, self.groups = cfg, where, max(1, int(groups))
        self.callbacks, self.idle_s = list(callbacks or []), idle_s
        self.name = f"service_{uuid.uuid4().hex[:8]}"
        self.requests: Any = None
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._env = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the worker groups (once); returns at once: a group takes requests when it is up."""
        from ray.util.queue import Queue

        from mer.runtime.session import started_local

        with self._lock:
            if self.requests is not None or self._closed:
                return
            # No CPU: the queue actor only relays requests.
            self.requests = Queue(actor_options={"num_cpus": 0})
            self._env.enter_context(controller_poll_interval(self.cfg.train.poll_interval_s,
                                                             preemption_watcher=not started_local()))
            for g in range(self.groups):
                t = threading.Thread(target=self._group, args=(g,), name=f"mer-fit-service-{g}", daemon=True)
                t.start()
                self._threads.append(t)
            log.info("fit service %s: %d worker group(s) of %d worker(s) starting", self.name, self.groups,
                     self.cfg.train.resources.concurrency)

    def _group(self, g: int) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        tc = self.cfg.train
        storage_path, fs = ray_storage(self.where)
        trainer = TorchTrainer(
            service_loop_per_worker,
            train_loop_config={"requests": self.requests, "threads": max(1, int(tc.resources.num_cpus)),
                               "idle_s": self.idle_s},
            torch_config=TorchConfig(backend="nccl" if tc.resources.num_gpus > 0 else "gloo"),
            scaling_config=tc.resources.scaling_config(),
            run_config=RunConfig(name=f"{self.name}_g{g}", storage_path=storage_path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=tc.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
                                 callbacks=self.callbacks),
        )
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported to every client, which raise it
            if not self._closed:
                log.error("fit service %s: worker group %d failed: %s", self.name, g, e)
                self._fail(e)

    def _fail(self, err: BaseException) -> None:
        """A group is gone with the request it held: stop the service, so that every client (in this process or
        another) raises instead of waiting for an answer that cannot come."""
        self.error = err
        with contextlib.suppress(Exception):
            self.requests.shutdown(force=True)

    def client(self) -> FitClient:
        """A client of this service in this process (it raises the service's own error if a group fails); the
        service starts with the client's first request."""
        return FitClient(service=self)

    def requests_handle(self) -> Any:
        """The service's request queue, started if need be: what a client in another process is given."""
        self.start()
        return self.requests

    def close(self) -> None:
        """End every group (each finishes its request first) and remove the service's checkpoints."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.requests is not None:
            if self.error is None:
                with contextlib.suppress(Exception):
                    for _ in self._threads:
                        self.requests.put(SERVICE_STOP)
            for t in self._threads:
                t.join()
            with contextlib.suppress(Exception):
                self.requests.shutdown()
            self._env.close()
            # ``where`` is the job's folder for service checkpoints; a killed job's service left its own there.
            with contextlib.suppress(Exception):
                storage.delete_dir(self.where)


class FitClient:
    """Hands fits to a :class:`FitService` and waits for their answers on a queue of its own. Thread-safe: answers
    another thread waits for are kept for it."""

    def __init__(self, requests: Any = None, service: FitService | None = None, poll_s: float = 2.0) -> None:
        self.requests, self.service, self.poll_s = requests, service, poll_s
        self.replies: Any = None  # made at the first run: a client that never trains starts nothing
        self._lock = threading.Lock()
        self._mail: dict[str, list[dict[str, Any]]] = {}
        self._seen_groups: set[float] = set()  # groups (their loop start) whose start-up was already counted

    def warm(self) -> None:
        """Start the service's worker groups now, if they are not up yet."""
        if self.service is not None:
            self.service.start()

    def run(self, fits: list[dict[str, Any]], *, store: PartStore, mods: list[str], dims: dict[str, int],
            on_result: Callable[[str, Result], None] | None = None,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Result]:
        """Train ``fits`` (each its own request, so that the service's groups share them) on ``store``'s rows of
        ``mods``; returns per fit key what :func:`mer.train.fold.run_fits` returns per fit. ``on_result(key,
        result)`` is called as each fit is answered (a run commits its fold then); ``on_progress(metrics)`` with
        every epoch's report."""
        from ray.util.queue import Queue

        with self._lock:
            if self.requests is None and self.service is not None:
                self.requests = self.service.requests_handle()
            if self.replies is None:
                self.replies = Queue(actor_options={"num_cpus": 0})  # no CPU: it only relays answers
        # The workers run elsewhere (another directory, another node): a local store by its absolute path.
        uri = store.uri if storage.is_s3(store.uri) else os.path.abspath(os.path.expanduser(store.uri))
        submitted: dict[str, tuple[str, float]] = {}
        for f in fits:
            rid = uuid.uuid4().hex
            submitted[rid] = (f["key"], time.time())
            self.requests.put({"id": rid, "store": uri, "parts": list(store.parts), "mods": list(mods),
                               "dims": {m: int(dims[m]) for m in mods}, "fits": [f],
                               "progress": on_progress is not None, "reply": self.replies})
        out: dict[str, Result] = {}
        while len(out) < len(submitted):
            msg = self._take({rid for rid, (key, _) in submitted.items() if key not in out})
            if msg is None:
                self._check()
                continue
            rid = msg["id"]
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(msg["progress"])
                continue
            key, t_submit = submitted[rid]
            if key in out:
                continue  # answered twice (a group restarted after answering): the first answer stands
            res = self._result(msg, key, t_submit)
            out[key] = res
            if on_result is not None:
                on_result(key, res)
        return out

    def _take(self, want: set[str]) -> dict[str, Any] | None:
        """The next message for one of ``want`` (request ids), or None after ``poll_s`` without one."""
        from ray.util.queue import Empty

        with self._lock:
            for rid in want:
                box = self._mail.get(rid)
                if box:
                    return box.pop(0)
            try:
                msg = self.replies.get(timeout=self.poll_s)
            except Empty:
                return None
            except Exception as e:  # noqa: BLE001 - the queue's actor gone: this client's process is ending
                raise ServiceError(f"fit service: the answer queue is gone ({e})") from e
            if msg["id"] in want:
                return msg
            self._mail.setdefault(msg["id"], []).append(msg)
            return None

    def _check(self) -> None:
        """Raise if the service stopped (a failed group: its request will never be answered)."""
        if self.service is not None and self.service.error is not None:
            raise ServiceError(f"fit service {self.service.name}: a worker group failed: "
                               f"{self.service.error}") from self.service.error
        try:
            self.requests.size()
        except Exception as e:  # noqa: BLE001 - any Ray error here means the queue's actor is gone
            raise ServiceError(f"fit service stopped ({type(e).__name__}: {e})") from e

    def _result(self, msg: dict[str, Any], key: str, t_submit: float) -> Result:
        startup = msg.get("startup") or {}
        loop_at = float(startup.get("loop_at", t_submit))
        first = loop_at not in self._seen_groups
        self._seen_groups.add(loop_at)
        timing = {"fit_s": float(msg["done_at"]) - t_submit,
                  # A group that started for this request: its start-up; one already up: nothing.
                  "group_start_s": max(0.0, loop_at - t_submit) if first else 0.0,
                  "imports_s": float(startup.get("imports_s", 0.0)) if first else 0.0,
                  "data_s": float(msg.get("data_s", 0.0)), "service": True}
        r = msg["results"][key]
        return {"state": r["state"], "best": r["best"], "val_pred": pq.read_table(io.BytesIO(r["val_pred"])),
                # The fit's checkpoints lived in the service's folder, which goes when the service closes.
                "checkpoint_path": f"fit service ({self.service.where if self.service else 'another process'}; "
                                   "removed when it closed)", "group_timing": timing}

    def close(self) -> None:
        if self.replies is not None:
            with contextlib.suppress(Exception):
                self.replies.shutdown()


_active: list[FitClient] = []  # the clients of the fit_service / using blocks this process is in (innermost last)


def active() -> FitClient | None:
    """The fit service :func:`mer.train.run.train_runs` hands its fits to here, if any."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def using(client: FitClient) -> Iterator[FitClient]:
    """Training inside the block hands its fits to ``client``'s service (a Tune trial given a study's service)."""
    _active.append(client)
    try:
        yield client
    finally:
        _active.remove(client)
        client.close()


@contextlib.contextmanager
def fit_service(cfg: MerConfig, where: str, *, groups: int = 1, callbacks: list[Any] | None = None
                ) -> Iterator[FitService]:
    """A :class:`FitService` for the block: training inside it (:func:`mer.train.run.train_runs`, in this process)
    hands its fits to the service's groups, which start with the first fit and end with the block."""
    svc = FitService(cfg, where, groups=groups, callbacks=callbacks)
    try:
        with using(svc.client()):
            yield svc
    finally:
        svc.close()


def job_service(cfg: MerConfig, store: PartStore, where: str, *, groups: int = 1,
                mods: list[str] | None = None) -> contextlib.AbstractContextManager[Any]:
    """:func:`fit_service` for a job of many runs on ``store`` (the label loop, an ablation, a study), or a block
    without one: when ``train.fit_service`` is off, a service is open already (the job joins it), or the store is
    too large to be read on the driver (``train.driver_rows_mb``) or scored there (``score.driver_rows_mb``, on
    CPUs): the service's groups hold their CPUs for the whole block, which a Ray Data read or scoring inside it
    would wait for."""
    tc = cfg.train
    if not tc.fit_service or active() is not None or tc.driver_rows_mb <= 0 or not tc.cache_shards:
        return contextlib.nullcontext()
    dims = modality_dims(store, mods or [m for m in tc.modalities if m in store.columns])
    rows = len(store.ids())
    if not (fits_in_mb(rows, dims.values(), tc.driver_rows_mb) and scored_on_driver(cfg, dims, rows)):
        return contextlib.nullcontext()
    return fit_service(cfg, where, groups=groups)
