"""A decode child for the tests: the real protocol and decoder, plus what only a test needs.

Run as the child of :class:`DoubleProcess` (``python tests/decode_double.py [HANG] NICENESS``), it serves
:data:`mer.extract.subproc.REQUESTS` and a ``reply`` request: it answers at once, or with ``hang=True`` never (it
blocks until the parent kills the child, which is what a timeout does). With ``HANG`` (``<path
substring>[:<backend>]``) ``decode_clip`` blocks the same way on matching requests, as decord does on some files:
the only way to exercise the decode timeout and the fallback on demand. Nothing here sleeps for a while and hopes
the parent's timeout is shorter.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from mer.extract.decode import ClipDecoder
from mer.extract.subproc import REQUESTS, DecodeProcess, serve

HERE = Path(__file__).resolve()


def _reply(hang: bool = False) -> None:
    if hang:
        _hang()


def _hang() -> None:
    """Blocks until the parent kills the child (SIGKILL: no handler runs, nothing answers)."""
    while True:
        signal.pause()


def _hanging(spec: str) -> Any:
    """``decode_clip`` that never answers on the requests ``spec`` matches."""
    sub, _, backend = spec.partition(":")

    def decode_clip(**kwargs: Any) -> Any:
        if sub in str(kwargs.get("video_path") or "") and (not backend or backend == kwargs.get("backend")):
            _hang()
        return REQUESTS["decode_clip"](**kwargs)

    return decode_clip


class DoubleProcess(DecodeProcess):
    """:class:`DecodeProcess` whose child is this file (``reply`` requests; decoding as usual)."""

    child_args: tuple[str, ...] = (str(HERE),)


def hanging_decoder(spec: str) -> type[ClipDecoder]:
    """A :class:`ClipDecoder` whose decode child hangs on the clips ``spec`` names (``<path substring>[:<backend>]``)."""

    class Process(DecodeProcess):
        child_args = (str(HERE), spec)

    return type("HangingClipDecoder", (ClipDecoder,), {"process_class": Process})


if __name__ == "__main__":
    *hang, niceness = sys.argv[1:] or ["0"]
    requests = {**REQUESTS, "reply": _reply}
    if hang:
        requests["decode_clip"] = _hanging(hang[0])
    serve(int(niceness), requests)
