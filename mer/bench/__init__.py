"""``mer bench <what>``: one module per benchmark, each registering its own subcommand.

A bench module has ``add_command(sub, parents)``: its ``mer bench <what>`` parser with its own flags and
``bench=<handler>`` as default (``preset=(overrides, profile)`` where it starts from its own config). The
``mer`` command resolves the config, starts Ray, sets ``args.ray_init_s`` and prints what the handler returns:
text as it is, anything else as JSON (``None``: the bench printed its table itself). A bench that sets
``needs_ray=False`` (in-process, features only) gets the config without a Ray session.
"""

from __future__ import annotations

import argparse
from typing import Any

from mer.bench import enrich, extract, fusion, labels, train, tune

BENCHES = (extract, train, enrich, labels, tune, fusion)


def add_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register every ``mer bench <what>`` subcommand on ``sub`` (the ``bench`` parser's subparsers)."""
    for bench in BENCHES:
        bench.add_command(sub, parents)
