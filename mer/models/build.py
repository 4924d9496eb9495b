"""Offline model builds: one directory per slot, built in a temp dir and moved into place atomically.

A completion marker holding the recipe's version makes builds idempotent (a finished slot is skipped, a
slot built by an older recipe is rebuilt) and safe under concurrent callers (``os.rename`` is atomic on
one filesystem; a concurrent builder's equivalent copy wins the race). Used by :mod:`mer.models.tiny` and
:mod:`mer.models.random`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mer.runtime.console import tame_libraries

log = logging.getLogger(__name__)

MARKER = ".mer-tiny-complete"  # name kept: existing tiny-model caches stay valid


def marker(slot_dir: Path) -> str | None:
    """The recipe version a finished build of ``slot_dir`` recorded (None: absent or unfinished)."""
    try:
        return (slot_dir / MARKER).read_text().strip()
    except OSError:
        return None


def is_complete(slot_dir: Path, version: str) -> bool:
    """True when ``slot_dir`` holds a finished build of ``version``."""
    return marker(slot_dir) == version


def build_slot(out_dir: Path, slot: str, builder: Callable[[Path], None], version: str, force: bool = False) -> Path:
    """Build one slot with ``builder(tmp_dir)`` into a temp dir next to its final place and move it there."""
    dst = out_dir / slot
    if not force and is_complete(dst, version):
        return dst
    tmp = Path(tempfile.mkdtemp(prefix=f".{slot}.build-", dir=out_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the models are shared with Ray workers and other users
    try:
        _quiet_transformers()  # here, not per call: a finished slot costs no transformers import
        builder(tmp)
        (tmp / MARKER).write_text(version)
        if dst.exists():
            if not force and is_complete(dst, version):  # another process finished first
                return dst
            # Stale/partial/forced: move it aside first so the final rename is a single atomic step.
            trash = Path(tempfile.mkdtemp(prefix=f".{slot}.old-", dir=out_dir))
            try:
                os.rename(dst, trash / slot)
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, dst)
        except OSError:
            # A concurrent builder renamed its copy in between; theirs is equivalent (same recipe and seed).
            if not is_complete(dst, version):
                raise
        log.info("built model %s -> %s", slot, dst)
        return dst
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_slots(out_dir: str | os.PathLike, builders: dict[str, Callable[[Path], None]], versions: dict[str, str],
                slots: list[str], force: bool = False, kind: str = "model") -> dict[str, str]:
    """Build ``slots`` into ``out_dir/<slot>``; returns ``{slot: absolute directory}``."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in slots if s not in builders]
    if unknown:
        raise ValueError(f"unknown {kind} slots {unknown}; choose from {list(builders)}")
    return {slot: str(build_slot(out, slot, builders[slot], versions[slot], force)) for slot in slots}


def _quiet_transformers() -> None:
    """A small model saves at once, so ``save_pretrained``'s "Writing model shards" bar and transformers' notices
    (e.g. a processor falling back because torchvision is absent) are console noise on a fresh machine: the bar is
    off and transformers' own console handler is tamed like other libraries' (its records go to the log file)."""
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()
    hf_logging.get_logger("transformers")  # creates the library's console handler, for tame_libraries to find
    tame_libraries()
