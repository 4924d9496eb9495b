"""What every job adds to ``mer <command>``: a log of the (redacted) command line and of where it runs.

A job resolves no config of its own: it runs ``mer.cli.main`` with its arguments, which logs the resolved
config (redacted) it then runs with — the same function the ``mer`` command uses.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("mer.jobs")


def job_main(command: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """Run ``mer <command> <argv>`` as a Ray job and return its exit code.

    Arguments are the CLI's (``mer.cli.build_parser``: ``--config``, ``--overlay``, ``--set``, …), so a job
    accepts the flags of its command; the handler's ``init_ray`` joins the cluster of the submitted job
    (``ray.init()`` honours RAY_ADDRESS).
    """
    from mer.cli import build_parser, main
    from mer.runtime.session import setup_logging
    from mer.store.redact import environment_summary, redact

    full = [*command, *(sys.argv[1:] if argv is None else argv)]
    setup_logging(build_parser().parse_args(full).log_level)
    log.info("job mer %s", " ".join(redact(list(full))))
    log.info("environment: %s", environment_summary())
    return main(full, log_config=True)
