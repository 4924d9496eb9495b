"""``mer bench extract --rss``: memory of the driver and of each worker group over a long stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mer.bench.rss import growth, process_group, tree_rss

ROOT = Path(__file__).resolve().parents[1]


def test_processes_are_grouped_by_what_they_run() -> None:
    assert process_group("ray::MapWorker(MapBatches(ClipDecoder))", None) == "ClipDecoder"
    assert process_group("ray::MapWorker(MapBatches(timed(AudioEncoder)))", None) == "AudioEncoder"
    assert process_group("ray::MapWorker(MapBatches(ClipDecoder)).submit()", None) == "ClipDecoder"
    assert process_group("ray::ReadParquet->MapBatches(assemble_batch)", None) == "assemble_batch"
    assert process_group("ray::IDLE", None) == "idle workers"
    assert process_group("ray::_StatsActor.register_dataset", None) == "ray system"
    assert process_group("/venv/bin/python -m mer.extract.subproc", "ClipDecoder") == "ClipDecoder"  # its actor's
    assert process_group("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x", None) == "ray system"
    mb = tree_rss()
    assert mb["rss"]["driver"] > 10 and 5 < mb["anon"]["driver"] < mb["rss"]["driver"]  # numpy, pyarrow loaded


def test_growth_is_the_slope_once_warm() -> None:
    # the driver leaks 0.5 MB per 100 clips after a warm-up jump; the decoder is flat
    samples = [{"rows": r, "rss": {"driver": (100 if r < 200 else 300) + 0.005 * r, "ClipDecoder": 150.0}}
               for r in range(0, 2001, 100)]
    g = growth(samples, warm_rows=500)
    assert g["driver"]["mb_per_1000_clips"] == pytest.approx(5.0, abs=1e-6)
    assert g["ClipDecoder"]["mb_per_1000_clips"] == pytest.approx(0.0, abs=1e-6)
    assert g["driver"]["warm_mb"] == pytest.approx(302.5) and g["driver"]["end_mb"] == pytest.approx(310.0)
    assert g["driver"]["first_mb"] == 100 and g["driver"]["max_mb"] == pytest.approx(310.0)
    assert list(g) == ["driver", "ClipDecoder"]
    # a group seen only during start-up has figures but no slope
    early = growth([{"rows": 0, "rss": {"driver": 1.0, "IDLE": 9.0}}, *samples], warm_rows=500)
    assert early["IDLE"] == {"first_mb": 9.0, "warm_mb": None, "end_mb": 9.0, "max_mb": 9.0,
                             "mb_per_1000_clips": None, "mb_per_1000_clips_late": None}
    # a heap that settles: the late slope (over the later half of the warm samples) shows it
    settling = [{"rows": r, "rss": {"driver": 200 + 10 * min(r, 1000) / 1000}} for r in range(0, 2001, 100)]
    g = growth(settling, warm_rows=0)["driver"]
    assert g["mb_per_1000_clips"] > 3 and g["mb_per_1000_clips_late"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_bench_extract_rss_samples_the_driver_and_every_stage(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The bench as a user runs it (its own local Ray), on a short stream: every clip extracted, the driver and
    each actor pool sampled, a slope per group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update({"PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(ROOT / ".cache")})
    proc = subprocess.run([sys.executable, "-m", "mer.cli", "bench", "extract", "--profile", "tiny", "--rss", "120",
                           "--json", "--out", str(tmp_path / "work"), "--set", "extract.rows_per_part=8",
                           "--set", "extract.encoders.text.resources.batch_size=4",  # rows stream in steadily
                           "--set", "extract.encoders.colocate=never",  # one pool (and group) per encoder
                           "--set", f"storage.tiny_models_dir={tiny_models_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    assert r["processed"] == 120 and r["rows_per_part"] == 8
    g = r["growth"]
    for group in ("driver", "ClipDecoder", "FaceDetector", "AudioEncoder", "TextEncoder", "ray system"):
        assert g[group]["max_mb"] > 20, (group, g)  # every stage's actor was seen, with its decode child
    assert g["driver"]["mb_per_1000_clips"] is not None  # sampled through the whole stream
    assert 0 < r["growth_anon"]["driver"]["end_mb"] < g["driver"]["end_mb"]
    assert r["samples"] >= 3 and r["trace"][-1]["rows"] == 120
    rows = [s["rows"] for s in r["trace"]]
    assert rows == sorted(rows)  # the rows committed only grow
