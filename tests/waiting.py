"""The one way the tests wait for something: :func:`wait_for` polls a probe until it answers or a deadline passes.

A module of its own (no fixtures, no pytest import), so that what runs outside the test process can use it too:
a drill's driver, a Ray Train callback or a Ray Data task (ship it by value:
``ray.cloudpickle.register_pickle_by_value(waiting)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T], timeout_s: float, *, every_s: float = 0.05,
             details: Callable[[], str] | None = None) -> T:
    """Call ``probe()`` every ``every_s`` seconds until it returns something truthy, and return that; after
    ``timeout_s`` seconds raise :class:`TimeoutError` naming ``what`` (and ``details()``, e.g. a log's tail).

    A probe that finds the wait hopeless (the process it watches exited) raises; the error passes through. Deadlines
    are generous bounds for a loaded machine, never what a test measures."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() >= deadline:
            extra = details() if details is not None else ""
            raise TimeoutError(f"{what}: not within {timeout_s:g} s" + (f"\n{extra}" if extra else ""))
        time.sleep(every_s)
