"""Faults the tests inject from outside ``mer/``: a Ray Train callback that kills a training worker, or its
whole node, at an exact point of a run. A module of its own (no fixtures, no environment changes), so that a
driver process of a drill can import it too. Shipped to Ray Train's controller by value, with :mod:`waiting`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from waiting import wait_for


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Ray's raylet starts its workers in process groups of their own, so a
    process group is not a node)."""
    from mer.bench.rss import process_table

    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in process_table().items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def kill_tree(root: int) -> None:
    """A node lost at once: ``root`` (a ``ray start --block`` process) and every process below it — raylet,
    object store, agents, workers — frozen first (SIGSTOP, so none reacts to another's death), then SIGKILLed."""
    procs = [root, *_descendants(root)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in procs:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class KillWorker:
    """A Ray Train callback (``train_run(callbacks=[...])``) that SIGKILLs one training worker for real, once:
    when fold ``fold`` has reported epoch ``in_epoch - 1`` (its checkpoint registered), the worker of rank
    ``rank`` is in epoch ``in_epoch``. ``marker`` records it (and when: ``reached_at <time>``). With
    ``node_pid`` it kills that ``ray start`` process and everything below it instead (:func:`kill_tree`): the
    worker's node lost at that moment. It runs in the Ray Train controller of the fold's group, so it is shipped
    there by value (``ray.cloudpickle.register_pickle_by_value(faults)``)."""

    def __init__(self, marker: Path, in_epoch: int, rank: int = 0, fold: int = 0,
                 node_pid: int | None = None, fit: str | None = None) -> None:
        assert in_epoch >= 2, "a worker is killed after an epoch's report: in epoch 2 at the earliest"
        self.marker, self.in_epoch, self.rank, self.fold = Path(marker), in_epoch, rank, fold
        self.fit = fit  # a job of several runs: the fit (its key) whose fold is meant
        self.node_pid = node_pid

    def callback(self) -> Any:
        from ray.train import UserCallback

        spec = self

        class _Kill(UserCallback):
            killed_pid: int | None = None

            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                m = metrics[spec.rank]
                if m["fold"] != spec.fold:  # a group's folds report through one controller
                    return
                if spec.fit is not None and m.get("fit") != spec.fit:  # another run's fold of the same number
                    return
                if self.killed_pid is not None:
                    # The workers report without waiting for the controller, so reports they made before the kill
                    # landed can still be registered after it: the run resumes from the last of those.
                    if int(m["pid"]) == self.killed_pid:
                        with spec.marker.open("a") as f:
                            f.write(f"registered epoch {m['epoch']} after the kill\n")
                    return
                if m["epoch"] != spec.in_epoch - 1 or spec.marker.exists():
                    return
                self.killed_pid = int(m["pid"])
                if spec.node_pid is not None:  # the worker's whole node
                    kill_tree(spec.node_pid)
                    spec.marker.write_text(f"killed the node of rank {spec.rank} at epoch {spec.in_epoch}\n")
                    return
                spec.marker.write_text(f"killed rank {spec.rank} at epoch {spec.in_epoch} pid {m['pid']} "
                                       f"reached_at {time.time()!r}\n")
                os.kill(self.killed_pid, signal.SIGKILL)

        return _Kill()


def last_registered_epoch(marker: Path, in_epoch: int) -> int:
    """The last epoch whose report (and checkpoint) Ray Train registered from the killed worker group: the
    kill's trigger, epoch ``in_epoch - 1``, or a later one it had already reported when the kill landed."""
    later = [int(line.split()[2]) for line in Path(marker).read_text().splitlines()
             if line.startswith("registered epoch ")]
    return max([in_epoch - 1, *later])


class HoldFold:
    """A Ray Train callback that holds fold ``fold`` after its report of epoch ``after_epoch`` until ``marker``
    exists (another fold's :class:`KillWorker` wrote it), for at most ``timeout_s``. The held fold's worker group
    stays up meanwhile (its next report waits for this one), so a test can prove that two folds train at the same
    time whatever the machine's load: run in turn, the held fold would wait for a fold that never starts, and it
    fails."""

    def __init__(self, marker: Path, fold: int = 0, after_epoch: int = 1, timeout_s: float = 300.0,
                 arrived: Path | None = None) -> None:
        self.marker, self.fold, self.after_epoch, self.timeout_s = Path(marker), fold, after_epoch, timeout_s
        self.arrived = Path(arrived) if arrived is not None else None  # written when the fold gets there

    def callback(self) -> Any:
        from ray.train import UserCallback

        spec = self

        class _Hold(UserCallback):
            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                if metrics[0]["fold"] != spec.fold or metrics[0]["epoch"] != spec.after_epoch:
                    return
                if spec.arrived is not None:
                    spec.arrived.write_text(f"fold {spec.fold} reported epoch {spec.after_epoch}\n")
                wait_for(f"fold {spec.fold} held until {spec.marker} is written (by a fold training beside it)",
                         spec.marker.exists, spec.timeout_s)

        return _Hold()
