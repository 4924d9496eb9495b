"""Ray Data settings for the datasets a block of code creates."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

# Re-entrant: a block may read a part store (which sets its own fields) inside another block.
_lock = threading.RLock()


@contextlib.contextmanager
def data_context(**fields: Any) -> Iterator[None]:
    """``DataContext`` fields set for the datasets created inside the block, restored afterwards.

    A dataset deep-copies the current DataContext when it is created, so restoring it leaves everyone else's
    datasets as they were. Runs of one driver that overlap in threads take turns here, so that none restores
    a value another one set and leaves the process with it.
    """
    from ray.data import DataContext

    with _lock:
        ctx = DataContext.get_current()
        old = {k: getattr(ctx, k) for k in fields}
        for k, v in fields.items():
            setattr(ctx, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(ctx, k, v)
