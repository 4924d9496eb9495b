"""What a person sees: a short console (mer's own progress and results) and the rest in ``<out>/logs/``.

Ray, Ray Data, Ray Train, DeepSpeed and vLLM write hundreds of lines per run (operator tables, engine configs,
checkpoint notices, every worker's stdout). At the default level they go to files: ``mer.log`` (every Python
logger of the driver, ``mer`` included) and ``ray-workers.log`` (what Ray's workers and actors print, which Ray
otherwise copies to the driver's console). The console keeps ``mer``'s INFO lines, anyone's errors, and one
progress line per stream. ``--log-level debug`` puts everything back on the console.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(message)s"

_state: dict[str, Any] = {"debug": False, "log_dir": None, "file": None, "workers": None}


class _LazyFileHandler(logging.FileHandler):
    """A log file (and its folder) created on the first record: commands that log nothing leave no trace."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class _ConsoleFilter(logging.Filter):
    """mer's INFO and above; other libraries' errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mer" or record.name.startswith("mer."):
            return True
        return record.levelno >= logging.ERROR


def log_dir() -> Path | None:
    """Where this process's logs go (None before :func:`setup` was given a directory)."""
    return _state["log_dir"]


def setup(level: str = "INFO", directory: str | Path | None = None) -> None:
    """Configure logging for a command: console filtered unless ``level`` is DEBUG; with ``directory``, every
    logger also writes to ``directory/mer.log``. Safe to call again (handlers are replaced, not added)."""
    debug = level.upper() == "DEBUG"
    _state["debug"] = debug
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mer", False):
            root.removeHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT if debug else CONSOLE_FORMAT))
    if not debug:
        console.addFilter(_ConsoleFilter())
    console._mer = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.getLogger("mer").setLevel(logging.DEBUG if debug else logging.INFO)
    if directory is not None:
        d = Path(directory).resolve()
        _state["log_dir"] = d
        fh = _LazyFileHandler(d / "mer.log")
        fh.setFormatter(logging.Formatter(FORMAT))
        fh.setLevel(logging.DEBUG if debug else logging.INFO)
        fh._mer = True  # type: ignore[attr-defined]
        root.addHandler(fh)
        _state["file"] = fh
    if not debug:
        # Python warnings (deprecations from Ray Data and friends) become log records: file, not console.
        logging.captureWarnings(True)
    tame_libraries()


def tame_libraries() -> None:
    """Route the loggers that libraries configure with their own console handlers (``ray``, ``ray.data``,
    ``ray.train``, ``vllm`` …, which do not propagate to the root) to the log file, errors still on the console.
    Call again after importing such a library."""
    if _state["debug"]:
        return
    fh = _state["file"]
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        # ray.llm gives every logger it creates later (e.g. its model-download helper, first used when a vLLM stage
        # starts) a stdout handler of its own unless this parent has one. With this no-op handler they propagate to
        # ``ray``'s handlers instead, which the loop below sends to the log file (errors still on the console).
        llm.addHandler(logging.NullHandler())
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or name == "mer" or name.startswith("mer."):
            continue
        for h in [h for h in lg.handlers if getattr(h, "_mer", False) and h is not fh]:
            lg.removeHandler(h)  # an earlier command's log file (commands run in one process: tests, jobs)
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and getattr(h, "stream", None) in (sys.stderr, sys.stdout):
                h.setLevel(max(h.level, logging.ERROR))
        if fh is not None and lg.handlers and not lg.propagate and fh not in lg.handlers:
            lg.addHandler(fh)


def route_worker_output() -> None:
    """Send what Ray's workers print (the driver's ``log_to_driver`` stream) to ``ray-workers.log`` instead of
    the console. Uses the dispatcher behind ``log_to_driver``; if a Ray release renames it, output stays on
    the console, which is only noisier."""
    if _state["debug"] or _state["log_dir"] is None:
        return
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if _state["workers"] is None:
        _state["log_dir"].mkdir(parents=True, exist_ok=True)
        _state["workers"] = open(_state["log_dir"] / "ray-workers.log", "a", buffering=1)  # noqa: SIM115
    sink: TextIO = _state["workers"]

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        ray_worker.print_worker_logs(data, sink, ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("mer_worker_logs")
    dispatcher.add_handler("mer_worker_logs", to_file)
    # The raylet's warnings to the driver (e.g. "N worker processes have been started") take another path:
    # the error-listener thread calls this module function by name.
    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = to_file


def ray_session_logs() -> str | None:
    """The local Ray session's log folder (raylet, GCS, every worker's own files), when known."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 (no public accessor)
        return node.get_logs_dir_path() if node is not None else None
    except (AttributeError, ImportError):
        return None


def footer() -> list[str]:
    """Closing lines that name the log files (empty when logs go nowhere but the console)."""
    d = _state["log_dir"]
    if d is None or _state["debug"] or not (d / "mer.log").exists():
        return []
    lines = [f"logs: {d}/mer.log"]
    if _state["workers"] is not None:
        lines[0] += f", {d}/ray-workers.log"
    session = ray_session_logs()
    if session:
        lines.append(f"ray session logs: {session}")
    return lines


class Progress:
    """One line per stream: rows done of total, rows/s and ETA. On a terminal the line updates in place; in a
    log or a pipe it is printed at most every ``every_s`` seconds (and at the end).

    The rate counts the rows after the first ones, from when those arrived: the wait for the first rows is
    start-up (actor pools, an LLM engine), and a rate over it made a 30 s job read "0.02 rows/s, ETA 21218 s"."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, every_s: float = 15.0) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.last = 0.0
        self.first: tuple[float, int] | None = None  # (when, rows) of the first update
        self.enabled = not _state["debug"]

    def line(self, now: float | None = None) -> str:
        """The progress line at ``now`` (``time.monotonic()``; default: now)."""
        now = time.monotonic() if now is None else now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        head = f"{self.label}: {self.done}/{self.total} rows ({pct:.0f}%)"
        if self.first is None:
            return f"{head}, starting"
        t1, n1 = self.first
        if self.done > n1 and now > t1:
            rate = (self.done - n1) / (now - t1)
            return f"{head}, {rate:.2f} rows/s, ETA {(self.total - self.done) / rate:.0f} s"
        return f"{head}, first rows after {t1 - self.t0:.0f} s, ETA -"

    def update(self, n: int) -> None:
        """``n`` more rows are done."""
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line(now) + " " * 4)
            self.stream.flush()
        elif now - self.last >= self.every_s and self.done < self.total:
            self.stream.write(self.line(now) + "\n")
            self.last = now

    def close(self) -> None:
        """Print the final line (elapsed time instead of ETA)."""
        if not self.enabled:
            return
        dt = time.monotonic() - self.t0
        final = f"{self.label}: {self.done}/{self.total} rows in {dt:.0f} s"
        self.stream.write(("\r" + final + " " * 30 + "\n") if self.tty else final + "\n")
        self.stream.flush()
