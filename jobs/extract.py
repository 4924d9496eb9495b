"""``python -m jobs.extract``: manifest -> Parquet feature store (decode, face crops, four encoders on Ray Data).

Same flags as ``mer extract``, e.g.::

    ray job submit --working-dir . -- python -m jobs.extract --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer extract`` with ``argv`` (default: this process's arguments)."""
    return job_main(["extract"], argv)


if __name__ == "__main__":
    sys.exit(main())
