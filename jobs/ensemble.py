"""``python -m jobs.ensemble``: several runs (or a study's best trials) as one soft-voting run directory.

Same flags as ``mer ensemble``, e.g.::

    ray job submit --working-dir . -- python -m jobs.ensemble --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer ensemble`` with ``argv`` (default: this process's arguments)."""
    return job_main(["ensemble"], argv)


if __name__ == "__main__":
    sys.exit(main())
