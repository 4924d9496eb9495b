"""``python -m jobs.llm_vote``: ask the enrichment LLM for one label per clip (a label-loop source).

Same flags as ``mer llm-vote``, e.g.::

    ray job submit --working-dir . -- python -m jobs.llm_vote --config ray_config.yaml --manifest M --out V.parquet
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer llm-vote`` with ``argv`` (default: this process's arguments)."""
    return job_main(["llm-vote"], argv)


if __name__ == "__main__":
    sys.exit(main())
