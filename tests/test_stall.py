"""A stream that stops moving says so: the stall rules on a clock the test drives, the thread hand-over, and a
real `mer extract` joined to a fixed cluster whose CPUs another job holds."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer.runtime import stall
from mer.runtime.stall import PoolState, StallWatch, StreamStalled, watched

from waiting import wait_for

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(stall.time, "monotonic", c)
    monkeypatch.setattr(stall, "describe", lambda what, pools, quiet: f"{what} stalled {quiet:.0f} s: {pools}")
    return c


def pools(alive: int = 1, starting: int = 0, waiting: int = 1) -> list[PoolState]:
    return [PoolState("MapWorker(MapBatches(ClipDecoder))", {"CPU": 0.5}, alive=1),
            PoolState("MapWorker(MapBatches(EncoderGroup))", {"CPU": 1.0}, alive=alive - 1 if alive else 0,
                      starting=starting, waiting=waiting)]


def test_a_pool_waiting_for_resources_fails_after_the_stall_time(clock: Clock) -> None:
    watch = StallWatch("the stream", timeout_s=300, poll_s=10, probe=lambda: pools())
    watch.progressed()
    for _ in range(29):  # 290 s without a row
        clock.now += 10
        watch.check()
    clock.now += 10
    with pytest.raises(StreamStalled, match="the stream stalled 300 s"):
        watch.check()


def test_rows_and_actors_coming_up_are_progress(clock: Clock) -> None:
    states = itertools.chain([pools(waiting=1)] * 20, [pools(alive=2, waiting=0)] * 100)
    watch = StallWatch("s", timeout_s=300, probe=lambda: next(states))
    watch.progressed()
    for _ in range(20):
        clock.now += 10
        watch.check()
    clock.now += 100  # 300 s since the last row: but the waiting actor came up just now
    watch.check()
    clock.now += 290
    watch.check()
    watch.progressed()  # a row
    clock.now += 299
    watch.check()
    clock.now += 1
    with pytest.raises(StreamStalled):
        watch.check()


def test_start_up_does_not_count_unless_it_takes_four_stall_times(clock: Clock) -> None:
    watch = StallWatch("s", timeout_s=300, probe=lambda: pools(alive=1, starting=1, waiting=0))
    watch.progressed()
    clock.now += 1199  # an engine loading its weights for 20 min is starting, not stalled
    watch.check()
    clock.now += 2
    with pytest.raises(StreamStalled):
        watch.check()


def test_an_autoscaling_cluster_keeps_waiting_and_logs_the_table(clock: Clock,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    watch = StallWatch("s", timeout_s=300, autoscaler=True, probe=lambda: pools())
    watch.progressed()
    with caplog.at_level("WARNING", logger="mer.stall"):
        for _ in range(3):
            clock.now += 301
            watch.check()  # never raises
    assert caplog.text.count("waiting for the cluster to add nodes") == 3


def test_zero_turns_the_watch_off(clock: Clock) -> None:
    watch = StallWatch("s", timeout_s=0, probe=lambda: pools())
    clock.now += 10**6
    watch.check()


def test_the_hand_over_keeps_items_errors_and_closes_the_source() -> None:
    closed = []

    def source():
        try:
            yield from range(5)
        finally:
            closed.append(True)

    watch = StallWatch("s", timeout_s=300, poll_s=0.5, probe=lambda: [])
    assert list(watched(source, watch)) == [0, 1, 2, 3, 4]

    class Lost(RuntimeError):
        pass

    def failing():
        yield 1
        raise Lost("node gone")

    with pytest.raises(Lost, match="node gone"):  # the producer's own error type (stream restarts need it)
        list(watched(failing, watch))
    closed.clear()
    it = watched(source, watch)
    assert next(it) == 0
    it.close()  # the consumer stops early: the producer closes the source at its next item
    wait_for("the source closed", lambda: closed, 30, every_s=0.1)
    assert closed == [True]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mer_extract_on_a_full_fixed_cluster_fails_with_the_placement_table(
        ray_local, ray_head, tiny_config, clip_manifest: str, tmp_path: Path) -> None:
    """Another job holds the cluster's CPUs: the stream's pools pass the size check (the cluster is big enough)
    and then wait; after the stall time `mer extract` ends with one `mer:` line and the table, no traceback."""
    import ray

    from mer.config import dump_config

    free = ray.available_resources().get("CPU", 0.0)

    @ray.remote(num_cpus=free)
    class Holder:
        def ping(self) -> str:
            return "held"

    holder = Holder.remote()
    try:
        assert ray.get(holder.ping.remote(), timeout=120) == "held"
        config = tmp_path / "config.yaml"
        config.write_text(dump_config(tiny_config))
        timeout_s = 20
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "mer.cli", "extract", "--config", str(config), "--manifest", clip_manifest,
             "--out", str(tmp_path / "features"), "--set", f"ray.address={ray_head.address}",
             "--set", f"ray.stall_timeout_s={timeout_s}", "--set", "ray.stall_poll_s=2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
        elapsed = time.monotonic() - t0
    finally:
        ray.kill(holder)
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("mer: ")]
    quiet = re.search(r"made no progress for (\d+) s", lines[0]) if len(lines) == 1 else None
    assert quiet, err[-3000:]
    # The watch looks every ray.stall_poll_s (2 s): it fires at the first look after the stall time.
    assert timeout_s <= int(quiet.group(1)) <= timeout_s + 2 * 2, lines[0]
    assert "the cluster has 2 CPU" in err and "free now 0 CPU" in err
    # the stream's first Ray work (the input blocks' metadata tasks) is named, with what each asks
    waiting = [ln for ln in err.splitlines() if ln.strip().startswith("task ") and "waiting for resources" in ln
               and "each asks 1 CPU" in ln]
    assert waiting and "waiting for resources: task " in err, err[-3000:]
    # it ended because of the watch, not after Ray gave up by itself (a generous bound: start-up on a busy box)
    assert elapsed < timeout_s + 240
