"""``mer bench extract --rss N``: memory over a long extraction stream, driver and workers.

Every feature row passes through the driver (it commits the parts, :mod:`mer.store.parts`), and actors live for the
whole stream, so a leak of a few kB per clip is invisible on a test's 20 clips and fatal on MER2025's 20,000.
The bench runs the real :func:`mer.extract.pipeline.extract_features` over ``N`` clips (a few short generated
videos, each listed many times under its own clip_id, small frames) into a scratch store while a thread samples,
every ``interval_s``, the resident memory of the driver and of every process of the local Ray that mer started
(actors grouped by their class; the decode child with its actor's group; Ray's own daemons as one group)
against the rows committed so far. Growth is the slope of a line fitted to the samples taken once the stream is
warm (after ``warm_fraction`` of the clips), in MB per 1,000 clips.

Linux only (``/proc``). RSS counts the object-store pages a process has touched (shared memory, bounded by the
store's size), so it can rise while nothing leaks; anonymous memory (the heap) is reported next to it, and is
what a leak grows.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer.config import MerConfig, with_overrides
from mer.extract.pipeline import extract_features
from mer.extract.subproc import rss_bytes
from mer.runtime.session import init_ray
from mer.synth.clips import make_clip_set

RSS_OVERRIDES = ["extract.decode.num_frames=4", "extract.decode.frame_size=64"]  # small frames: many clips fast


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux /proc)."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


# Ray's own actors and agents, counted with its daemons.
RAY_PROCESSES = ("ActorLocationTracker", "DashboardAgent", "RuntimeEnvAgent")


def process_group(cmd: str, parent_group: str | None) -> str:
    """What a process is: an actor's class (``ray::MapWorker(MapBatches(ClipDecoder))`` -> ``ClipDecoder``), a
    task's function, an idle worker, the decode child (counted with its actor), or Ray's own (daemons, agents,
    internal actors: ``ray system``)."""
    if cmd.startswith("ray::"):
        names = re.findall(r"\(([A-Za-z_][\w]*)\)", cmd)
        name = names[-1] if names else cmd[5:].split()[0].split("(")[0].split(".")[0]
        if name == "IDLE":
            return "idle workers"
        return "ray system" if name.startswith("_") or name in RAY_PROCESSES else name
    if "mer.extract.subproc" in cmd and parent_group:
        return parent_group
    return "ray system"


def anon_bytes(pid: int) -> int:
    """A process's anonymous memory (its heap: not files, not the shared-memory object store), from
    ``/proc/<pid>/smaps_rollup``; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(root: int | None = None) -> dict[str, dict[str, float]]:
    """``{"rss": …, "anon": …}``: resident and anonymous MB of ``root`` (default: this process, ``driver``) and
    of each group of its descendants. RSS counts the object-store pages a process has touched (shared memory,
    bounded by the store's size); anonymous memory is what a leak grows."""
    root = root or os.getpid()
    procs = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    rss: dict[str, float] = {"driver": rss_bytes(root) / 2**20}
    anon: dict[str, float] = {"driver": anon_bytes(root) / 2**20}
    stack = [(c, None) for c in children.get(root, [])]
    while stack:
        pid, parent_group = stack.pop()
        group = process_group(procs[pid][1], parent_group)
        stack.extend((c, group) for c in children.get(pid, []))
        resident = rss_bytes(pid)
        if resident:  # 0: it exited since the listing
            rss[group] = rss.get(group, 0.0) + resident / 2**20
            anon[group] = anon.get(group, 0.0) + anon_bytes(pid) / 2**20
    return {"rss": rss, "anon": anon}


class RssSampler:
    """A thread sampling :func:`tree_rss` with the rows committed to a local part store so far."""

    def __init__(self, store: Path, rows_per_part: int, total: int, interval_s: float = 1.0) -> None:
        self.store, self.rows_per_part, self.total, self.interval_s = store, rows_per_part, total, interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rows(self) -> int:
        """Rows committed so far (full parts: a part is committed whole, the last one may be short)."""
        return min(self.total, len(list(self.store.glob("part-*.parquet"))) * self.rows_per_part)

    def sample(self) -> None:
        self.samples.append({"t": round(time.time(), 2), "rows": self.rows(), **tree_rss()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append({"t": round(time.time(), 2), "rows": self.total, **tree_rss()})


def growth(samples: list[dict[str, Any]], warm_rows: int, key: str = "rss") -> dict[str, dict[str, Any]]:
    """Per process group, over the samples it appears in (``key``: ``rss`` or ``anon`` MB): MB first, once warm
    (the first sample with at least ``warm_rows`` committed rows), last and at most, and the slope of a line
    fitted to the warm samples in MB per 1,000 clips, and the same over their later half (a heap that settles
    shows a smaller late slope); ``None`` with fewer than 3 samples (a group that lived only through start-up,
    like a decode pool that finished its input early)."""
    groups = sorted({g for s in samples for g in s[key]}, key=lambda g: (g != "driver", g))
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        seen = [s for s in samples if g in s[key]]
        warm = [(s["rows"], s[key][g]) for s in seen if s["rows"] >= warm_rows]
        late = [(r, m) for r, m in warm if warm and r >= (warm[0][0] + warm[-1][0]) / 2]
        out[g] = {"first_mb": round(seen[0][key][g], 1), "warm_mb": round(warm[0][1], 1) if warm else None,
                  "end_mb": round(seen[-1][key][g], 1), "max_mb": round(max(s[key][g] for s in seen), 1),
                  "mb_per_1000_clips": _slope(warm), "mb_per_1000_clips_late": _slope(late)}
    return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    """MB per 1,000 rows of a line fitted to (rows, MB); None with fewer than 3 points or a single row count."""
    if len(points) < 3 or len({r for r, _ in points}) < 2:
        return None
    return round(float(np.polyfit([r for r, _ in points], [m for _, m in points], 1)[0]) * 1000, 2)


def rss_manifest(workdir: Path, n_clips: int, distinct: int = 24) -> pa.Table:
    """``n_clips`` manifest rows over ``distinct`` short generated clips (each listed under many clip_ids,
    with its own subtitle), as a long real job would list them."""
    base = make_clip_set(workdir / "clips", n_ok=min(distinct, n_clips), broken=False, seconds=1.0,
                         width=160, height=120)
    paths = base.column("video_uri").to_pylist()
    labels = base.column("label").to_pylist()
    rows = [{"clip_id": f"rss_{i:06d}", "video_uri": paths[i % len(paths)], "audio_uri": None,
             "text": f"第{i}句字幕，今天怎么样？", "label": labels[i % len(labels)], "split": "train"}
            for i in range(n_clips)]
    return pa.Table.from_pylist(rows)


def bench_rss(cfg: MerConfig, n_clips: int = 2000, *, workdir: str | None = None, interval_s: float | None = None,
              warm_fraction: float = 0.25) -> dict[str, Any]:
    """Extract ``n_clips`` generated clips with small frames and report driver/worker RSS growth per 1,000
    clips once warm (see the module docstring). ``workdir`` is a local directory (default: a new temp dir) for
    the clips, the manifest and the scratch store; the local Ray is started (and fitted) here. ``interval_s``:
    between samples (default 1 s, 0.25 s under 1,000 clips, which stream by in a few seconds)."""
    if interval_s is None:
        interval_s = 1.0 if n_clips >= 1000 else 0.25
    cfg = init_ray(with_overrides(cfg, RSS_OVERRIDES))
    work = Path(workdir or tempfile.mkdtemp(prefix="mer-bench-rss-"))
    manifest = work / "manifest.parquet"
    pq.write_table(rss_manifest(work, n_clips), manifest)
    store = work / "features"
    with RssSampler(store, cfg.extract.rows_per_part, n_clips, interval_s) as sampler:
        summary = extract_features(cfg, str(manifest), str(store), verbose=False)
    warm_rows = int(warm_fraction * n_clips)
    return {"clips": n_clips, "processed": summary["processed"], "seconds": summary["seconds"],
            "clips_per_s": summary["clips_per_s"], "rows_per_part": cfg.extract.rows_per_part,
            "decode_recycle_every": cfg.extract.decode.recycle_every, "frames": RSS_OVERRIDES,
            "warm_after_rows": warm_rows, "samples": len(sampler.samples),
            "growth": growth(sampler.samples, warm_rows), "growth_anon": growth(sampler.samples, warm_rows, "anon"),
            "trace": sampler.samples}


def format_rss(r: dict[str, Any]) -> str:
    """The bench's table: one line per process group, resident and anonymous memory."""
    lines = [f"memory over {r['processed']} clips ({r['clips_per_s']} clips/s, {r['samples']} samples; parts of "
             f"{r['rows_per_part']} rows; decode child recycled every {r['decode_recycle_every']} clips); growth "
             f"in MB per 1,000 clips fitted from {r['warm_after_rows']} clips on (late: over the later half):",
             f"  {'process':<32}{'RSS warm':>9}{'end':>8}{'max':>8}{'growth':>9}{'late':>9}   "
             f"{'anon warm':>9}{'end':>8}{'max':>8}{'growth':>9}{'late':>9}"]

    def cells(m: dict[str, Any]) -> str:
        v = ["-" if m[k] is None else m[k] for k in ("warm_mb", "end_mb", "max_mb", "mb_per_1000_clips",
                                                     "mb_per_1000_clips_late")]
        return f"{v[0]:>9}{v[1]:>8}{v[2]:>8}{v[3]:>9}{v[4]:>9}"

    for g, m in r["growth"].items():
        lines.append(f"  {g:<32}{cells(m)}   {cells(r['growth_anon'][g])}")
    return "\n".join(lines)
