"""Drills as a cluster user lives them: a two-node Ray cluster on this machine (a head with no CPUs, so all the
work runs on one 2-CPU worker node), ``mer`` commands as separate driver processes, and the failures clusters
have — the worker node lost mid-stream (SIGKILL to every process of it), a fresh node joining later, and the
driver itself killed. What must hold is what a user needs: the command finishes by itself (or, for a killed
driver, a re-run finishes what is left), with every clip exactly once.

The test chooses the moment of each failure. Extraction: it waits for the first committed part, then holds the
driver (SIGSTOP) so nothing more is committed while the node goes; the driver resumes once the new node is
starting, and finds its actors and their results gone with the old one. Scoring (under a second of work once
its actor is up): the node goes as soon as the scorer actor runs on it. Training: a Ray Train callback kills
the node right after fold 0's epoch-2 report (``tests/drill_train.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import faults
import pyarrow.parquet as pq
import pytest
from conftest import SESSION_TOKEN, RayHead
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
MER = [sys.executable, "-m", "mer.cli"]
N_OK = 40  # + 6 broken inputs = 46 clips

# make check leaves the module out: two-node clusters, nodes lost mid-run, a trained run
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# A lost node is declared dead after ~3 s instead of Ray's default ~15 s (GCS health checks of the raylets).
FAST_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "3"}


class DrillCluster:
    """A head (0 CPUs: it only coordinates) and one 2-CPU worker node, which :meth:`lose_worker` kills."""

    def __init__(self) -> None:
        self.head = RayHead(SESSION_TOKEN, num_cpus=0, dashboard=False, env=FAST_DEATH)
        self.worker = self._worker()
        self.lost: list[RayHead] = []
        self.drivers: list[subprocess.Popen] = []

    def _worker(self) -> RayHead:
        return RayHead(SESSION_TOKEN, num_cpus=2, address=self.head.address, env=FAST_DEATH)

    def lose_worker(self) -> None:
        """The worker node gone at once (SIGKILL to all its processes), a fresh one joining after it."""
        self.worker.kill()
        self.lost.append(self.worker)
        self.worker = self._worker()

    def stop(self) -> None:
        for proc in self.drivers:  # a driver a failed test left behind (held or running)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for node in [self.worker, *self.lost, self.head]:
            node.stop()


@pytest.fixture(scope="module")
def drill() -> DrillCluster:
    cluster = DrillCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def drill_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    from mer.synth.clips import make_clip_set

    d = tmp_path_factory.mktemp("drill_clips")
    table = make_clip_set(d / "clips", n_ok=N_OK)
    pq.write_table(table, d / "manifest.parquet")
    return str(d / "manifest.parquet"), table.column("clip_id").to_pylist()


@pytest.fixture(scope="module")
def drill_config(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The suite's tiny config, small parts and small batches (rows reach the driver a few at a time and are
    committed in many parts, so a failure lands between two of them: the last encoder's batch is the block the
    driver gets, and at the text encoder's 32 most of the 46 clips would arrive at once)."""
    from mer.config import dump_config, with_overrides

    # score.driver_rows_mb=0: the drill's store is small enough to be scored on the driver, and the drill is
    # about the scoring actor pool losing its node.
    cfg = with_overrides(tiny_config, ["extract.rows_per_part=4", "score.rows_per_part=4", "score.driver_rows_mb=0",
                                       "score.resources.batch_size=4", "extract.decode.resources.batch_size=4",
                                       *(f"extract.encoders.{b}.resources.batch_size=4"
                                         for b in ("global_visual", "face", "audio", "text"))])
    path = tmp_path_factory.mktemp("drill_cfg") / "config.yaml"
    path.write_text(dump_config(cfg))
    return str(path)


class Driver:
    """One ``mer`` command as its own driver process of the drill cluster (stdout: its result; stderr: its
    console)."""

    def __init__(self, drill: DrillCluster, args: list[str], log: Path, command: list[str] = MER) -> None:
        env = {**os.environ, "RAY_ADDRESS": drill.head.address,
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        self.log, self.result_path = log, log.with_suffix(".json")
        self._files = [open(self.result_path, "w"), open(log, "w")]  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([*command, *args], cwd=ROOT, env=env, stdout=self._files[0],
                                     stderr=self._files[1])
        drill.drivers.append(self.proc)

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> None:
        """Fails the test when the driver has exited (a wait for what it would do is then over)."""
        if self.proc.poll() is not None:
            pytest.fail(f"the driver exited ({self.proc.returncode}):\n{self.console()[-4000:]}")

    def wait_for_parts(self, store: Path, timeout_s: float = 600.0) -> None:
        """Until the first part is committed to ``store`` (the stream is running and writing)."""

        def committed() -> bool:
            self.running()
            return any(store.glob("part-*.parquet"))

        wait_for(f"a part committed to {store}", committed, timeout_s, details=lambda: self.console()[-4000:])

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = 900.0) -> dict:
        """Asserts exit code 0; the command's result (the last line of JSON on stdout)."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            for f in self._files:
                f.close()
        assert rc == 0, self.console()[-6000:]
        return json.loads([x for x in self.result_path.read_text().splitlines() if x.startswith("{")][-1])


def _rows(store: Path) -> list[str]:
    """Every committed row's clip_id, duplicates kept (what a reader would have to de-duplicate)."""
    from mer.store.parts import part_files, read_parts

    if not part_files(str(store)):
        return []
    return read_parts(str(store), columns=["clip_id"], key=None).column("clip_id").to_pylist()


def _lose_node_holding_driver(drill: DrillCluster, driver: Driver, store: Path, n: int) -> int:
    """Hold the driver (nothing more is committed), lose the worker node, let the driver go on; the rows
    committed when the node went (fewer than ``n``: the drill hit a running stream)."""
    driver.signal(signal.SIGSTOP)
    try:
        committed = len(_rows(store))
        assert committed < n, "the stream finished before the node was lost: the drill proved nothing"
        drill.lose_worker()
    finally:
        driver.signal(signal.SIGCONT)
    return committed


def _lose_node_mid_stream(drill: DrillCluster, driver: Driver, store: Path, n: int) -> int:
    """Once ``store`` has a part: :func:`_lose_node_holding_driver`."""
    driver.wait_for_parts(store)
    return _lose_node_holding_driver(drill, driver, store, n)


def _actor_on_worker(drill: DrillCluster, cls: str) -> bool:
    """Whether an actor of class ``cls`` runs on the worker node (a process of it titled ``ray::…(cls)…``)."""
    from faults import _descendants

    for pid in _descendants(drill.worker.proc.pid):
        try:
            if f"({cls})" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            pass
    return False


def _lose_node_once_actor_runs(drill: DrillCluster, driver: Driver, cls: str, store: Path, n: int) -> int:
    """Lose the worker node as soon as an actor of ``cls`` runs there (a stream too short to be caught between
    two commits from outside: scoring 46 rows takes well under a second once its actor is up); the rows
    committed by then (fewer than ``n``)."""

    def on_worker() -> bool:
        driver.running()
        return _actor_on_worker(drill, cls)

    wait_for(f"a {cls} actor on the worker node", on_worker, 600, every_s=0.02,
             details=lambda: driver.console()[-4000:])
    return _lose_node_holding_driver(drill, driver, store, n)


@pytest.fixture(scope="module")
def extract_drill(drill: DrillCluster, drill_manifest, drill_config: str, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("drill_extract")
    manifest, ids = drill_manifest
    store = root / "features"
    driver = Driver(drill, ["extract", "--config", drill_config, "--manifest", manifest, "--out", str(store)],
                    root / "console.txt")
    committed = _lose_node_mid_stream(drill, driver, store, len(ids))
    result = driver.wait()
    return {"store": store, "ids": ids, "committed_at_loss": committed, "result": result,
            "console": driver.console()}


def test_extract_finishes_by_itself_when_its_worker_node_is_lost(extract_drill: dict) -> None:
    rows = _rows(extract_drill["store"])
    assert sorted(rows) == sorted(extract_drill["ids"])  # every clip, exactly once
    r = extract_drill["result"]
    assert r["processed"] == len(extract_drill["ids"]) and r["already_stored"] == 0
    assert 0 < extract_drill["committed_at_loss"] < len(rows)
    from mer.store.parts import read_parts

    status = dict(zip(*read_parts(str(extract_drill["store"]), columns=["decode_status"]).to_pydict().values()))
    assert status["ok_000"] == "ok" and status["missing"] == "missing_file" and status["zero_byte"] == "decode_error"


def test_score_finishes_by_itself_when_its_worker_node_is_lost(drill: DrillCluster, extract_drill: dict,
                                                               drill_manifest, drill_config: str,
                                                               trained_run: Path, tmp_path: Path) -> None:
    """Scoring raw videos whose features are already extracted (the extract drill's store, as a resumed
    scoring job finds them): the node goes with the scorer actor that has just started on it."""
    manifest, ids = drill_manifest
    out = tmp_path / "scores"
    shutil.copytree(extract_drill["store"], out / "features")
    driver = Driver(drill, ["score", "--config", drill_config, "--run", str(trained_run), "--manifest", manifest,
                            "--out", str(out)], tmp_path / "console.txt")
    _lose_node_once_actor_runs(drill, driver, "EnsemblePredictor", out / "predictions", len(ids))
    result = driver.wait()
    assert sorted(_rows(out / "predictions")) == sorted(ids)
    assert result["score"]["written"] == len(ids) and result["extract"]["processed"] == 0
    sub = (out / "submission.csv").read_text().splitlines()
    assert len(sub) == len(ids) + 1


def test_a_killed_driver_is_resumed_by_running_the_command_again(drill: DrillCluster, drill_manifest,
                                                                 drill_config: str, tmp_path: Path) -> None:
    manifest, ids = drill_manifest
    store = tmp_path / "features"
    args = ["extract", "--config", drill_config, "--manifest", manifest, "--out", str(store)]
    first = Driver(drill, args, tmp_path / "first.txt")
    first.wait_for_parts(store)
    first.signal(signal.SIGKILL)
    first.proc.wait(timeout=60)
    committed = _rows(store)
    assert 0 < len(committed) < len(ids)
    again = Driver(drill, args, tmp_path / "again.txt").wait()
    assert again["already_stored"] == len(committed)
    assert again["processed"] == len(ids) - len(committed)
    assert sorted(_rows(store)) == sorted(ids)


def test_training_continues_the_same_run_when_its_worker_node_is_lost(drill: DrillCluster, train_cfg,
                                                                       train_store: str, trained_run: Path,
                                                                       tmp_path: Path) -> None:
    """A training run (``tests/drill_train.py``: ``train_run`` as ``mer train`` calls it) with both folds' worker
    groups on the worker node: the node is killed from fold 0's Ray Train controller right after its epoch-2
    report, a fresh node joins, FailureConfig restarts the groups there from their checkpoints, and the run is,
    bit for bit, the one trained without interruption (the suite's trained run: same config, seed, store)."""
    from test_train_resume import _computed

    from mer.config import dump_config

    cfg = tmp_path / "train.yaml"
    cfg.write_text(dump_config(train_cfg(**{"train.max_failures": 2})))
    run, marker = tmp_path / "run", tmp_path / "killed.txt"
    driver = Driver(drill, [str(cfg), train_store, str(run), str(marker), str(drill.worker.proc.pid)],
                    tmp_path / "console.txt", command=[sys.executable, str(ROOT / "tests" / "drill_train.py")])

    def killed() -> bool:
        driver.running()
        return marker.exists()

    wait_for("fold 0's epoch-2 report (and the node lost after it)", killed, 600, every_s=0.1,
             details=lambda: driver.console()[-4000:])
    assert "killed the node of rank 0 at epoch 3" in marker.read_text()
    drill.lose_worker()  # already gone: a fresh node joins
    metrics = driver.wait()
    resumed = metrics["folds"][0]["resumed_from"]
    # From the last checkpoint registered before the node was lost, not from scratch.
    assert resumed == [faults.last_registered_epoch(marker, 3)], (metrics["folds"], marker.read_text())
    assert _computed(run) == _computed(trained_run)
    assert pq.read_table(run / "oof.parquet").equals(pq.read_table(trained_run / "oof.parquet"))
