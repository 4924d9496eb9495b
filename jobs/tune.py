"""``python -m jobs.tune``: hyper-parameter search with Ray Tune (each trial a k-fold `mer train` run).

Same flags as ``mer tune``, e.g.::

    ray job submit --working-dir . -- python -m jobs.tune --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer tune`` with ``argv`` (default: this process's arguments)."""
    return job_main(["tune"], argv)


if __name__ == "__main__":
    sys.exit(main())
