"""The fit service (mer.train.service): worker groups that stay up for a job and train the fits of its runs as
they are handed over. The session's ablation (conftest ``ablation``) trains its three runs on one; here: those
runs equal the same runs trained alone, bit for bit; the groups start once; a worker killed mid-fit is restarted
by Ray Train and the fit continues from its checkpoint; a group lost for good fails the run instead of hanging."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import faults
import pyarrow.parquet as pq
import pytest

from mer.store import storage
from mer.store.parts import PartStore
from mer.train import train_run
from mer.train.service import ServiceError, active, fit_service, job_service

COMPUTED = ("fold", "epoch", "train_loss", "val_loss", "val_waf", "val_acc", "best_val_waf")


def _computed(run: Path) -> list[tuple]:
    hist = storage.read_table(str(run) + "/history.parquet").to_pylist()
    return sorted(tuple(r[k] for k in COMPUTED) for r in hist)


def _same_run(a: Path, b: Path) -> None:
    import torch

    assert _computed(a) == _computed(b)
    for k in (0, 1):
        wa = torch.load(io.BytesIO((a / "models" / f"fold_{k}.pt").read_bytes()), map_location="cpu", weights_only=True)
        wb = torch.load(io.BytesIO((b / "models" / f"fold_{k}.pt").read_bytes()), map_location="cpu", weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), f"fold {k} weights"
    assert pq.read_table(a / "oof.parquet").equals(pq.read_table(b / "oof.parquet"))


@pytest.mark.slow
def test_an_ablation_on_the_service_starts_its_groups_once_and_equals_runs_trained_alone(
        ray_local, ablation, train_cfg, train_store: str, tmp_path: Path) -> None:
    """``mer ablation`` on its fit service (the default) against the session's ablation, whose runs each started
    their own worker group: the same three runs to the last bit, and one group start for all of them."""
    from mer.train import ablation_table

    table_alone, alone = ablation
    out = tmp_path / "ablation"
    # The store by a path relative to the driver's directory: the workers, which run elsewhere, still find it.
    assert ablation_table(train_cfg(), os.path.relpath(train_store), str(out)) == table_alone
    order = ["audio", "text", "fused"]  # ablation_table trains the single modalities first, then the fused run
    timings = [storage.read_json(str(out / name / "metrics.json"))["timing"] for name in order]
    assert all(t["rows"] == "service" for t in timings), [t["rows"] for t in timings]
    assert storage.read_json(str(alone / "fused" / "metrics.json"))["timing"]["rows"] == "driver"
    # Only the first run's first fit can have waited for the group to start; every later fit found it up.
    starts = [[g["group_start_s"] for g in t["groups"]] for t in timings]
    assert all(s == 0 for s in starts[0][1:]) and all(s == 0 for run in starts[1:] for s in run), starts
    # The service's checkpoints went with it: every fold's outputs are in its run directory.
    assert not (out / "ray").exists()
    assert active() is None
    for name in order:
        _same_run(out / name, alone / name)


@pytest.mark.slow
def test_a_worker_killed_mid_fit_on_the_service_continues_the_fit(
        ray_local, train_store: str, trained_run: Path, train_cfg, kill_worker, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed in fold 0's third epoch: Ray Train restarts the service's group (FailureConfig), the
    group finds the request in its checkpoint and continues the fit there; the run equals the uninterrupted one."""
    marker = tmp_path / "killed.txt"
    kill = kill_worker(marker, in_epoch=3, rank=1, fold=0)
    cfg = train_cfg(**{"train.max_failures": 1})
    run = tmp_path / "run"
    with fit_service(cfg, str(tmp_path / "ray"), callbacks=[kill.callback()]):
        metrics = train_run(cfg, train_store, str(run))
    assert marker.exists() and "killed rank 1 at epoch 3" in marker.read_text()
    assert metrics["timing"]["rows"] == "service"
    assert metrics["folds"][0]["resumed_from"] == [faults.last_registered_epoch(marker, 3)]
    assert metrics["folds"][1]["resumed_from"] == []
    epochs = sorted(r["epoch"] for r in pq.read_table(run / "history.parquet").to_pylist() if r["fold"] == 0)
    assert epochs == list(range(1, cfg.train.max_epochs + 1)), "every epoch recorded exactly once"
    _same_run(run, trained_run)


@pytest.mark.slow
def test_a_group_lost_for_good_fails_the_run_and_resume_finishes_it(
        ray_local, train_store: str, trained_run: Path, train_cfg, kill_worker, tmp_path: Path) -> None:
    """No restarts allowed: the killed group takes its request with it. The client raises (it does not wait for
    an answer that cannot come); the run resumed later trains what is missing and equals the uninterrupted one."""
    marker = tmp_path / "killed.txt"
    kill = kill_worker(marker, in_epoch=3, rank=0, fold=1)
    cfg = train_cfg(**{"train.max_failures": 0})
    run = tmp_path / "run"
    with pytest.raises(ServiceError, match="worker group failed"):
        with fit_service(cfg, str(tmp_path / "ray"), callbacks=[kill.callback()]):
            train_run(cfg, train_store, str(run))
    assert marker.exists()
    # Fold 0 was answered and committed before the loss; fold 1 was not.
    assert (run / "folds" / "fold_0.json").exists() and not (run / "folds" / "fold_1.json").exists()
    metrics = train_run(train_cfg(), train_store, str(run), resume=True)
    assert metrics["skipped_folds"] == [0]
    _same_run(run, trained_run)


def test_job_service_only_for_stores_read_and_scored_on_the_driver(train_store: str, train_cfg, tmp_path: Path
                                                                   ) -> None:
    store = PartStore(train_store)
    where = str(tmp_path / "ray")

    def opens(**extra: object) -> bool:
        return not isinstance(job_service(train_cfg(**extra), store, where), contextlib.nullcontext)

    assert opens()
    assert not opens(**{"train.fit_service": False})
    assert not opens(**{"train.driver_rows_mb": 0.01})  # rows read by Ray Data
    assert not opens(**{"score.driver_rows_mb": 0})  # scoring in an actor pool, which would wait for the CPUs
    assert not opens(**{"score.resources.num_gpus": 0.5})
