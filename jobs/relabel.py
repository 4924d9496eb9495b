"""``python -m jobs.relabel``: multi-source label refinement of the train split (one stage, no gate).

Same flags as ``mer relabel``, e.g.::

    ray job submit --working-dir . -- python -m jobs.relabel --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer relabel`` with ``argv`` (default: this process's arguments)."""
    return job_main(["relabel"], argv)


if __name__ == "__main__":
    sys.exit(main())
