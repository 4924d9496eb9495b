"""``python -m jobs.train``: k-fold ECMF fusion training with Ray Train + DeepSpeed.

Same flags as ``mer train``, e.g.::

    ray job submit --working-dir . -- python -m jobs.train --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer train`` with ``argv`` (default: this process's arguments)."""
    return job_main(["train"], argv)


if __name__ == "__main__":
    sys.exit(main())
