"""``python -m jobs.enrich``: LLM enrichment of the transcripts of a manifest (vLLM engine actors).

Same flags as ``mer enrich``, e.g.::

    ray job submit --working-dir . -- python -m jobs.enrich --config ray_config.yaml ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs._common import job_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mer enrich`` with ``argv`` (default: this process's arguments)."""
    return job_main(["enrich"], argv)


if __name__ == "__main__":
    sys.exit(main())
