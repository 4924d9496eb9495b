"""Failure for real: a training worker is SIGKILLed mid-epoch and Ray Train restarts the worker group from
the last checkpoint (FailureConfig). The interrupted-run + ``resume=True`` case is in test_train_s3.py."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mer.train import train_run
from mer.train.fold import FAULT_ENV
from mer.train.synthetic import make_feature_store, small_config

EPOCHS = 5


def train_config(**extra: object):
    return small_config(["audio", "text"], **extra)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("store") / "features")
    make_feature_store(out, n=160, dims={"audio": 16, "text": 24}, seed=1, noise=1.0)
    return out


def _epochs(run: Path, fold: int) -> list[tuple[int, int]]:
    hist = pq.read_table(run / "history.parquet").to_pylist()
    return sorted((r["epoch"], r["attempt"]) for r in hist if r["fold"] == fold)


def test_killed_worker_resumes_from_checkpoint(ray_local, store: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "killed.txt"
    # Rank 1 of fold 0 kills itself (SIGKILL) in epoch 3, once.
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}:1:0")
    run = tmp_path / "run"
    metrics = train_run(train_config(**{"train.max_failures": 1, "train.max_epochs": EPOCHS,
                                        "train.patience": EPOCHS}), store, str(run))
    assert marker.exists() and "killed rank 1 at epoch 3" in marker.read_text()
    resumed = metrics["folds"][0]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] <= 2, resumed  # restarted from a checkpoint, not from scratch
    epochs = _epochs(run, 0)
    assert [e for e, _ in epochs] == list(range(1, EPOCHS + 1)), "every epoch recorded exactly once"
    assert all(a == (0 if e <= resumed[0] else 1) for e, a in epochs), epochs
    assert metrics["folds"][1]["resumed_from"] == []
    assert metrics["test"]["waf"] > 0.4
