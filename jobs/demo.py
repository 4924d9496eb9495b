"""``python -m jobs.demo``: the whole loop on generated data with tiny models (the cluster smoke test).

Same flags as ``mer demo``, e.g.::

    ray job submit --working-dir . -- python -m jobs.demo --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer demo`` with ``argv`` (default: this process's arguments)."""
    return job_main(["demo"], argv)


if __name__ == "__main__":
    sys.exit(main())
