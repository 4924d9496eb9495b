"""``python -m jobs.evaluate``: WAF / accuracy / per-class F1 of a predictions table.

Same flags as ``mer evaluate``, e.g.::

    ray job submit --working-dir . -- python -m jobs.evaluate --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer evaluate`` with ``argv`` (default: this process's arguments)."""
    return job_main(["evaluate"], argv)


if __name__ == "__main__":
    sys.exit(main())
