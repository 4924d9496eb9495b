"""A persistent decode child process that can be abandoned: per-clip timeouts and leak containment.

decord is reported to hang without an error on some files and to leak memory. The decode therefore runs
in a child process (``python -m mer.extract.subproc``) that the decode actor talks to over pipes with
length-prefixed pickles: a request that does not answer within the timeout gets the child killed (and a
fresh one started on the next request), and the child is replaced every ``recycle_every`` clips so leaked
memory is returned to the OS. The child dies with its parent (PR_SET_PDEATHSIG, and EOF on stdin).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

_HEADER = struct.Struct("<Q")
_ALLOWED = frozenset({"decode_clip"})  # the only backend functions a request may name


class DecodeTimeout(Exception):
    """The child did not answer in time (it was killed)."""


class ChildDied(Exception):
    """The child exited while handling a request (e.g. a segfault in the decoder)."""


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DecodeTimeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise DecodeTimeout()
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChildDied()
        buf.extend(chunk)
    return bytes(buf)


def _write_msg(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    f.write(_HEADER.pack(len(data)))
    f.write(data)
    f.flush()


def _read_msg(fd: int, deadline: float | None) -> Any:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 when unknown)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class DecodeProcess:
    """Client side: ``call(fn, kwargs, timeout)`` runs ``mer.extract.decoders.<fn>(**kwargs)`` in the child."""

    def __init__(self, recycle_every: int = 500, start_timeout: float = 120.0):
        self.recycle_every = recycle_every
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.calls = 0
        self.restarts = 0  # children replaced after a timeout or a crash
        self.recycles = 0  # children replaced on schedule

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mer.extract.subproc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        # Imports (numpy, decord, av, cv2) happen before "ready": not charged to a clip's timeout.
        ready = _read_msg(self.proc.stdout.fileno(), time.monotonic() + self.start_timeout)
        if ready != "ready":
            raise RuntimeError(f"decode child failed to start: {ready!r}")
        self.calls = 0

    def kill(self) -> None:
        """Stop the child now (SIGKILL: a hung decoder ignores anything gentler)."""
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss(self) -> int:
        """The child's resident memory in bytes (0 when not running)."""
        return rss_bytes(self.proc.pid) if self.proc is not None else 0

    def call(self, fn: str, kwargs: dict[str, Any], timeout: float) -> Any:
        """Run one request; raises DecodeTimeout / ChildDied (the child is then replaced lazily)."""
        if self.proc is not None and self.calls >= self.recycle_every:
            self.kill()
            self.recycles += 1
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self._start()
        assert self.proc is not None
        self.calls += 1
        try:
            _write_msg(self.proc.stdin, (fn, kwargs))
            status, value = _read_msg(self.proc.stdout.fileno(), time.monotonic() + timeout)
        except (DecodeTimeout, ChildDied, BrokenPipeError, OSError) as e:
            self.kill()
            self.restarts += 1
            if isinstance(e, DecodeTimeout):
                raise
            raise ChildDied(str(e) or e.__class__.__name__) from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def __del__(self) -> None:
        self.kill()


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _simulated_hang(kwargs: dict[str, Any]) -> bool:
    """Test hook: ``MER_TEST_DECODE_HANG=<path substring>[:<backend>]`` makes matching requests hang, the
    way decord does on some files (the only way to exercise the timeout on demand)."""
    spec = os.environ.get("MER_TEST_DECODE_HANG")
    if not spec:
        return False
    sub, _, backend = spec.partition(":")
    path = str(kwargs.get("video_path") or "")
    return bool(sub) and sub in path and (not backend or backend == kwargs.get("backend"))


def _serve() -> None:
    """Child main loop: the protocol owns the original stdout; fd 1 goes to stderr so that native
    libraries printing to stdout cannot corrupt a message."""
    _die_with_parent()
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from mer.extract import decoders

    decoders._decord()  # import (and silence) decord up front
    import av  # noqa: F401
    import cv2  # noqa: F401

    _write_msg(proto, "ready")
    fd = sys.stdin.fileno()
    while True:
        try:
            fn, kwargs = _read_msg(fd, None)
        except ChildDied:  # parent closed the pipe
            return
        try:
            if fn == "sleep":  # used by the tests to simulate a hanging decoder
                time.sleep(float(kwargs.get("seconds", 3600)))
                result: Any = ("ok", None)
            elif fn in _ALLOWED and _simulated_hang(kwargs):
                time.sleep(3600)
                result = ("ok", None)
            elif fn in _ALLOWED:
                result = ("ok", getattr(decoders, fn)(**kwargs))
            else:
                result = ("error", f"unknown request {fn!r}")
        except Exception as e:  # noqa: BLE001 - reported to the parent as the request's error
            result = ("error", f"{e.__class__.__name__}: {e}")
        _write_msg(proto, result)


if __name__ == "__main__":
    _serve()
