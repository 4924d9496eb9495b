"""``python -m jobs.score``: batch scoring -> predictions Parquet + MER2025 submission CSV.

Same flags as ``mer score``, e.g.::

    ray job submit --working-dir . -- python -m jobs.score --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer score`` with ``argv`` (default: this process's arguments)."""
    return job_main(["score"], argv)


if __name__ == "__main__":
    sys.exit(main())
