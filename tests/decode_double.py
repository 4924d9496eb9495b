"""A decode child for the tests: the real protocol and decoder, plus what only a test needs.

Run as the child of :class:`DoubleProcess` (``python tests/decode_double.py [HANG] NICENESS``), it serves
:data:`mer.extract.subproc.REQUESTS` and a ``sleep`` request (``seconds``: how long the child does not answer);
with ``HANG`` (``<path substring>[:<backend>]``) ``decode_clip`` hangs on matching requests, the way decord does
on some files: the only way to exercise the decode timeout and the fallback on demand.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mer.extract.decode import ClipDecoder
from mer.extract.subproc import REQUESTS, DecodeProcess, serve

HERE = Path(__file__).resolve()


def _sleep(seconds: float = 3600) -> None:
    time.sleep(float(seconds))


def _hanging(spec: str) -> Any:
    """``decode_clip`` that never answers on the requests ``spec`` matches."""
    sub, _, backend = spec.partition(":")

    def decode_clip(**kwargs: Any) -> Any:
        if sub in str(kwargs.get("video_path") or "") and (not backend or backend == kwargs.get("backend")):
            time.sleep(3600)
        return REQUESTS["decode_clip"](**kwargs)

    return decode_clip


class DoubleProcess(DecodeProcess):
    """:class:`DecodeProcess` whose child is this file (``sleep`` requests; no hang)."""

    child_args: tuple[str, ...] = (str(HERE),)


def hanging_decoder(spec: str) -> type[ClipDecoder]:
    """A :class:`ClipDecoder` whose decode child hangs on the clips ``spec`` names (``<path substring>[:<backend>]``)."""

    class Process(DecodeProcess):
        child_args = (str(HERE), spec)

    return type("HangingClipDecoder", (ClipDecoder,), {"process_class": Process})


if __name__ == "__main__":
    *hang, niceness = sys.argv[1:] or ["0"]
    requests = {**REQUESTS, "sleep": _sleep}
    if hang:
        requests["decode_clip"] = _hanging(hang[0])
    serve(int(niceness), requests)
