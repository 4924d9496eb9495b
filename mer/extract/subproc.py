"""A persistent decode child process that can be abandoned: per-clip timeouts and leak containment.

decord is reported to hang without an error on some files. The decode therefore runs in a child process
(``python -m mer.extract.subproc``) that the decode actor talks to over pipes: a request that does not
answer within the timeout gets the child killed (and a fresh one started), and the child is replaced
every ``recycle_every`` requests so memory a decoder leaks is returned to the OS. The child dies with its
parent (PR_SET_PDEATHSIG, and EOF on stdin).

Throughput: :meth:`DecodeProcess.map` keeps a window of requests queued in the child's stdin, so the
child starts the next clip as soon as it has written a result instead of waiting a round trip for the
parent; results carry their arrays out of band (pickle protocol 5 buffers written raw and read straight
into the arrays' memory), so a clip's frames are copied through the pipe once and never re-serialised.
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
from collections import deque
from typing import Any

from mer.extract import decoders

# message: pickle length, number of out-of-band buffers; then one length per buffer, the pickle, the buffers
_HEADER = struct.Struct("<QI")
_LEN = struct.Struct("<Q")
# The only functions a request may name (a test double serves more: tests/decode_double.py).
REQUESTS: dict[str, Any] = {"decode_clip": decoders.decode_clip}
_PIPE_BYTES = 1 << 20  # a 224 px clip's frames are ~2.4 MB: fewer wake-ups than the 64 KiB default
# Requests queued ahead in the child's stdin. Small (a request is a few hundred bytes, far below the pipe
# buffer, so writing them never blocks while the child is blocked writing a result).
DEFAULT_WINDOW = 4


class DecodeTimeout(Exception):
    """The child did not answer in time (it was killed)."""


class ChildDied(Exception):
    """The child exited while handling a request (e.g. a segfault in the decoder)."""


class RequestError(RuntimeError):
    """The request raised in the child (the child is fine and keeps serving)."""


def _read_into(fd: int, view: memoryview, deadline: float | None) -> None:
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DecodeTimeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise DecodeTimeout()
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise ChildDied()
        got += k


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    _read_into(fd, memoryview(buf), deadline)
    return buf


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _write_msg(fd: int, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    _write_all(fd, _HEADER.pack(len(data), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws) + data)
    for r in raws:
        _write_all(fd, r)


def _read_msg(fd: int, deadline: float | None) -> Any:
    n, nbuf = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    lens = _read_exact(fd, _LEN.size * nbuf, deadline) if nbuf else b""
    sizes = [_LEN.unpack_from(lens, _LEN.size * i)[0] for i in range(nbuf)]
    data = _read_exact(fd, n, deadline)
    buffers = [_read_exact(fd, s, deadline) for s in sizes]
    return pickle.loads(data, buffers=buffers)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 when unknown)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class DecodeProcess:
    """Client side: runs ``mer.extract.decoders.<fn>(**kwargs)`` in the child, one request or many.

    ``child_args``: what ``python`` runs as the child (its niceness is appended); a subclass may run another
    child that serves the same protocol (:func:`serve`), as the tests' decode double does."""

    child_args: tuple[str, ...] = ("-m", "mer.extract.subproc")

    def __init__(self, recycle_every: int = 500, start_timeout: float = 120.0, window: int = DEFAULT_WINDOW,
                 niceness: int = 0):
        self.recycle_every = recycle_every
        self.niceness = niceness
        self.start_timeout = start_timeout
        self.window = max(1, window)
        self.proc: subprocess.Popen | None = None
        self.calls = 0  # requests sent to the current child
        self.restarts = 0  # children replaced after a timeout or a crash
        self.recycles = 0  # children replaced on schedule
        self.child_cpu_s = 0.0  # CPU time of the children that are gone (see cpu_s)
        self.work_cpu_s = 0.0  # CPU time the children spent inside the requested functions (the rest: protocol)

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, *self.child_args, str(self.niceness)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        try:
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, AttributeError, OSError):  # not Linux, or above pipe-max-size: default size
            pass
        # Imports (numpy, decord, av, cv2) happen before "ready": not charged to a clip's timeout.
        ready = _read_msg(self.proc.stdout.fileno(), time.monotonic() + self.start_timeout)
        if ready != "ready":
            raise RuntimeError(f"decode child failed to start: {ready!r}")
        self.calls = 0

    def _ensure(self) -> None:
        if self.proc is not None and self.calls >= self.recycle_every:
            self.kill()
            self.recycles += 1
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self._start()

    def kill(self) -> None:
        """Stop the child now (SIGKILL: a hung decoder ignores anything gentler)."""
        if self.proc is not None:
            self.child_cpu_s += cpu_seconds(self.proc.pid)
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

    def cpu_s(self) -> float:
        """CPU seconds used by every child this client started (the decode work proper)."""
        return self.child_cpu_s + (cpu_seconds(self.proc.pid) if self.proc is not None else 0.0)

    def call(self, fn: str, kwargs: dict[str, Any], timeout: float) -> Any:
        """Run one request; raises DecodeTimeout / ChildDied (the child is then replaced lazily) or
        RequestError (the request raised in the child)."""
        (result,) = self.map(fn, [kwargs], timeout)
        if isinstance(result, Exception):
            raise result
        return result

    def map(self, fn: str, requests: list[dict[str, Any]], timeout: float) -> list[Any]:
        """Run ``fn(**kwargs)`` for each request, in order, with up to ``window`` requests queued in the child.

        Returns one entry per request: its result, or the exception it ended with (:class:`DecodeTimeout`,
        :class:`ChildDied`, :class:`RequestError`). Each request gets ``timeout`` seconds from the moment the
        child can start it (the previous answer, or its sending); one that runs over gets the child killed,
        and the requests queued behind it are sent again to a fresh child (they were not at fault).
        """
        results: list[Any] = [None] * len(requests)
        todo = deque(range(len(requests)))
        while todo:
            try:
                self._ensure()
            except (RuntimeError, OSError, DecodeTimeout, ChildDied) as e:  # the child cannot even start
                self.kill()
                for i in todo:
                    results[i] = ChildDied(f"decode child failed to start: {e!r}")
                break
            assert self.proc is not None
            fd = self.proc.stdout.fileno()
            inflight: deque[tuple[int, float]] = deque()  # (request index, when it was sent)
            last = time.monotonic()
            try:
                while todo or inflight:
                    while todo and len(inflight) < self.window and self.calls < self.recycle_every:
                        i = todo.popleft()
                        inflight.append((i, time.monotonic()))
                        self.calls += 1
                        _write_all(self.proc.stdin.fileno(), _frame((fn, requests[i])))
                    if not inflight:  # recycle point reached: the next round starts a fresh child
                        break
                    i, sent = inflight[0]
                    status, value, work_s = _read_msg(fd, max(sent, last) + timeout)
                    self.work_cpu_s += work_s
                    inflight.popleft()
                    last = time.monotonic()
                    results[i] = RequestError(value) if status == "error" else value
            except (DecodeTimeout, ChildDied, OSError) as e:
                self.kill()
                self.restarts += 1
                i, _ = inflight.popleft()
                results[i] = e if isinstance(e, DecodeTimeout) else ChildDied(str(e) or e.__class__.__name__)
                todo.extendleft(j for j, _ in reversed(inflight))
        return results

    def __del__(self) -> None:
        self.kill()


def _frame(obj: Any) -> bytes:
    """A small message (a request) as one byte string: written with one ``write``."""
    data = pickle.dumps(obj, protocol=5)
    return _HEADER.pack(len(data), 0) + data


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve(niceness: int = 0, requests: dict[str, Any] = REQUESTS) -> None:
    """Child main loop, answering the requests named in ``requests`` (name -> function of the request's keyword
    arguments). The protocol owns the original stdout; fd 1 goes to stderr so that native libraries printing
    to stdout cannot corrupt a message. ``niceness`` is added to the child's own (set here, not by a
    ``preexec_fn``, which is unsafe in the parent's threaded Ray worker)."""
    _die_with_parent()
    if niceness:
        os.nice(niceness)
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    decoders._decord()  # import (and silence) decord up front
    import av  # noqa: F401
    import cv2  # noqa: F401

    _write_msg(out, "ready")
    fd = sys.stdin.fileno()
    while True:
        try:
            fn, kwargs = _read_msg(fd, None)
        except ChildDied:  # parent closed the pipe
            return
        c0 = time.process_time()
        try:
            if fn in requests:
                result: Any = ("ok", requests[fn](**kwargs))
            else:
                result = ("error", f"unknown request {fn!r}")
        except Exception as e:  # noqa: BLE001 - reported to the parent as the request's error
            result = ("error", f"{e.__class__.__name__}: {e}")
        _write_msg(out, (*result, time.process_time() - c0))  # with the request's own CPU seconds


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
