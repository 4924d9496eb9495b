"""``python -m jobs.pseudolabel``: the label loop (source runs -> refinement -> pseudo-label rounds, gated).

Same flags as ``mer pseudolabel``, e.g.::

    ray job submit --working-dir . -- python -m jobs.pseudolabel --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer pseudolabel`` with ``argv`` (default: this process's arguments)."""
    return job_main(["pseudolabel"], argv)


if __name__ == "__main__":
    sys.exit(main())
