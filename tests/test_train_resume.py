"""Failure for real: a training worker is SIGKILLed mid-epoch and Ray Train restarts the worker group from
the last checkpoint (FailureConfig), or the run dies and ``resume=True`` continues it: either way the fold
continues the same run, bit for bit. Checkpoints on S3 are in test_train_s3.py."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mer.train import train_run
from mer.train.fold import FAULT_ENV, checkpoint_dirs, remove_unregistered_checkpoints
from mer.train.loop import shard_ids
from mer.train.synthetic import make_feature_store, small_config

EPOCHS = 5
# What a run computes; "seconds", "samples_per_s" and "attempt" describe how it ran.
COMPUTED = ("fold", "epoch", "train_loss", "val_loss", "val_waf", "val_acc", "best_val_waf")


def train_config(**extra: object):
    return small_config(["audio", "text"], **{"train.max_epochs": EPOCHS, "train.patience": EPOCHS, **extra})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("store") / "features")
    make_feature_store(out, n=160, dims={"audio": 16, "text": 24}, seed=1, noise=1.0)
    return out


@pytest.fixture(scope="module")
def uninterrupted(ray_local, store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_run(train_config(), store, str(run))
    return run


def _epochs(run: Path, fold: int) -> list[tuple[int, int]]:
    hist = pq.read_table(run / "history.parquet").to_pylist()
    return sorted((r["epoch"], r["attempt"]) for r in hist if r["fold"] == fold)


def _computed(run: Path) -> list[tuple]:
    hist = pq.read_table(run / "history.parquet").to_pylist()
    return sorted(tuple(r[k] for k in COMPUTED) for r in hist)


def _weights(path: Path) -> dict:
    import torch

    return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)


def test_killed_worker_resumes_from_checkpoint(ray_local, store: str, uninterrupted: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    marker = tmp_path / "killed.txt"
    # Rank 1 of fold 0 kills itself (SIGKILL) in epoch 3, once.
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}:1:0")
    run = tmp_path / "run"
    metrics = train_run(train_config(**{"train.max_failures": 1}), store, str(run))
    assert marker.exists() and "killed rank 1 at epoch 3" in marker.read_text()
    resumed = metrics["folds"][0]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] <= 2, resumed  # restarted from a checkpoint, not from scratch
    epochs = _epochs(run, 0)
    assert [e for e, _ in epochs] == list(range(1, EPOCHS + 1)), "every epoch recorded exactly once"
    assert all(a == (0 if e <= resumed[0] else 1) for e, a in epochs), epochs
    assert metrics["folds"][1]["resumed_from"] == []
    assert metrics["test"]["waf"] > 0.4

    # The restarted fold continued the same run: exact equality with the uninterrupted one (same seed;
    # gloo's collectives, DeepSpeed's fp32 ZeRO-2 checkpoints and one thread per worker are deterministic,
    # the random states and each rank's rows are restored).
    assert _computed(run) == _computed(uninterrupted)
    for k in (0, 1):
        ref, got = _weights(uninterrupted / "models" / f"fold_{k}.pt"), _weights(run / "models" / f"fold_{k}.pt")
        assert ref.keys() == got.keys() and all(torch.equal(ref[n], got[n]) for n in ref), f"fold {k} weights"
    assert pq.read_table(run / "oof.parquet").equals(pq.read_table(uninterrupted / "oof.parquet"))

    # Only checkpoints Ray Train registered are left (at most checkpoints_to_keep per fold).
    assert 1 <= len(checkpoint_dirs(str(run / "ray"), 0)) <= train_config().train.checkpoints_to_keep


def test_interrupted_run_resumed_equals_the_uninterrupted_one(ray_local, store: str, uninterrupted: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run dies (no retries left) in fold 0's epoch 3; ``resume=True`` in a new call continues it from the
    checkpoint in storage: the finished run is the uninterrupted one."""
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}:0:0")
    run = tmp_path / "run"
    with pytest.raises(Exception):
        train_run(train_config(), store, str(run))
    assert marker.exists()
    monkeypatch.delenv(FAULT_ENV)
    metrics = train_run(train_config(), store, str(run), resume=True)
    resumed = metrics["folds"][0]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] <= 2, resumed
    assert _computed(run) == _computed(uninterrupted)
    assert pq.read_table(run / "oof.parquet").equals(pq.read_table(uninterrupted / "oof.parquet"))


def test_shard_ids_partition_equally_whatever_the_order() -> None:
    ids = [f"c{i:03d}" for i in range(103)]
    parts = [shard_ids(ids, 4, r, seed=7) for r in range(4)]
    assert [len(p) for p in parts] == [25] * 4  # equal steps on every rank; 3 clips left out
    assert len(set().union(*parts)) == 100
    assert parts == [shard_ids(list(reversed(ids)), 4, r, seed=7) for r in range(4)]
    assert parts != [shard_ids(ids, 4, r, seed=8) for r in range(4)]


def test_unregistered_checkpoint_directories_are_removed(tmp_path: Path) -> None:
    ray_dir = tmp_path / "ray"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_orphan", "not_a_checkpoint"):
        (ray_dir / "fold_0" / name).mkdir(parents=True)
        (ray_dir / "fold_0" / name / "state.json").write_text("{}")
    registered = [str(ray_dir / "fold_0" / "checkpoint_a"), str(ray_dir / "fold_0" / "checkpoint_b")]
    assert remove_unregistered_checkpoints(str(ray_dir), 0, registered) == ["checkpoint_orphan"]
    assert checkpoint_dirs(str(ray_dir), 0) == ["checkpoint_a", "checkpoint_b"]
    assert (ray_dir / "fold_0" / "not_a_checkpoint").is_dir()
