"""Failure for real: a training worker is SIGKILLed mid-epoch (by a Ray Train callback of the test,
conftest.KillWorker) and Ray Train restarts the worker group from the last checkpoint (FailureConfig), or the
run dies and ``resume=True`` continues it from its checkpoints, on S3 (moto server on 127.0.0.1): either way
the fold continues the same run, bit for bit."""

from __future__ import annotations

import io
from pathlib import Path

import faults
import pyarrow.parquet as pq
import pytest

from mer.store import storage
from mer.train import load_ensemble, train_run
from mer.train.fold import checkpoint_dirs, group_name, remove_unregistered_checkpoints
from mer.train.worker import shard_ids

# What a run computes; "seconds", "samples_per_s" and "attempt" describe how it ran.
COMPUTED = ("fold", "epoch", "train_loss", "val_loss", "val_waf", "val_acc", "best_val_waf")


@pytest.fixture
def uninterrupted(trained_run: Path) -> Path:
    """The session's trained run (``train_cfg()`` on ``train_store``): what every interrupted run must equal."""
    return trained_run


def _epochs(run: Path, fold: int) -> list[tuple[int, int]]:
    hist = pq.read_table(run / "history.parquet").to_pylist()
    return sorted((r["epoch"], r["attempt"]) for r in hist if r["fold"] == fold)


def _computed(run: Path | str) -> list[tuple]:
    hist = storage.read_table(str(run) + "/history.parquet").to_pylist()
    return sorted(tuple(r[k] for k in COMPUTED) for r in hist)


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mer-test", Prefix=prefix)
            for o in page.get("Contents", [])]


def _weights(path: Path) -> dict:
    import torch

    return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_local, train_store: str, uninterrupted: Path, train_cfg,
                                               kill_worker, tmp_path: Path) -> None:
    import torch

    epochs_n = train_cfg().train.max_epochs
    marker = tmp_path / "killed.txt"
    # Rank 1 of fold 0 is killed (SIGKILL) in epoch 3, once.
    kill = kill_worker(marker, in_epoch=3, rank=1, fold=0)
    run = tmp_path / "run"
    metrics = train_run(train_cfg(**{"train.max_failures": 1}), train_store, str(run), callbacks=[kill.callback()])
    assert marker.exists() and "killed rank 1 at epoch 3" in marker.read_text()
    resumed = metrics["folds"][0]["resumed_from"]
    # Restarted from the last checkpoint registered before the kill, not from scratch.
    assert resumed == [faults.last_registered_epoch(marker, 3)], (resumed, marker.read_text())
    epochs = _epochs(run, 0)
    assert [e for e, _ in epochs] == list(range(1, epochs_n + 1)), "every epoch recorded exactly once"
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

    # Only checkpoints Ray Train registered are left (at most checkpoints_to_keep per group of folds).
    assert 1 <= len(checkpoint_dirs(str(run / "ray"), group_name([0, 1]))) <= train_cfg().train.checkpoints_to_keep


@pytest.mark.slow
def test_interrupted_run_on_s3_resumed_equals_the_uninterrupted_one(s3_server: str, ray_local, train_store: str,
                                                                    uninterrupted: Path, train_cfg, kill_worker,
                                                                    tmp_path: Path) -> None:
    """The run directory is on S3: Ray Train checkpoints land in the bucket. The run dies (a worker killed with
    no retries left) in fold 1's epoch 3, after fold 0 finished in the same worker group; ``resume=True`` in a
    new call continues it from the checkpoints in the bucket, without training fold 0 again: the finished run
    is the uninterrupted one."""
    epochs_n = train_cfg().train.max_epochs
    prefix = f"runs/{tmp_path.name}/"
    out = f"s3://mer-test/{prefix.rstrip('/')}"
    cfg = train_cfg(**{"train.max_failures": 0})
    marker = tmp_path / "killed.txt"
    # Rank 0 of fold 1 dies in epoch 3 with no retries left: the run fails after fold 0 finished.
    kill = kill_worker(marker, in_epoch=3, rank=0, fold=1)
    with pytest.raises(Exception) as failed:
        train_run(cfg, train_store, out, callbacks=[kill.callback()])
    assert marker.exists(), f"the run failed before the injected fault: {failed.value!r}"
    killed_at = marker.stat().st_mtime
    keys = _keys(s3_server, prefix)
    # The group did not finish, so no fold is committed; its checkpoints in the bucket hold fold 0's outputs.
    assert not any(k.startswith(prefix + "folds/fold_") for k in keys) and prefix + "metrics.json" not in keys
    group = [k for k in keys if k.startswith(f"{prefix}ray/{group_name([0, 1])}/checkpoint_")]
    assert any(k.endswith("/state.json") for k in group), "the group's checkpoints are in the bucket"
    assert any(k.endswith("/fold_0/val_pred.parquet") for k in group), "fold 0's outputs are in them"
    assert any("zero_pp_rank_1" in k for k in group), "rank 1's DeepSpeed shard uploaded too"

    from mer.tune.trial import FoldReports

    relay = FoldReports()  # what a study's trial hears of the folds: the resumed group reports fold 0 too
    metrics = train_run(cfg, train_store, out, resume=True, callbacks=[relay.callback()])
    # fold 0 came from the checkpoint as it was before the kill: not trained again
    assert metrics["folds"][0]["resumed_from"] == []
    assert storage.read_json(f"{out}/folds/fold_0.json")["finished_at"] < killed_at
    heard = [relay.queue.get() for _ in range(relay.queue.qsize())]
    assert [h for h in heard if h[0] == 0] == [(0, epochs_n, metrics["folds"][0]["val_waf"], True)]
    resumed = metrics["folds"][1]["resumed_from"]
    # Continued from the last S3 checkpoint registered before the failure.
    assert resumed == [faults.last_registered_epoch(marker, 3)], (resumed, marker.read_text())
    assert metrics["folds"][1]["epochs"] == epochs_n and metrics["test"] is not None
    assert _computed(out) == _computed(uninterrupted)
    assert storage.read_table(f"{out}/oof.parquet").equals(pq.read_table(uninterrupted / "oof.parquet"))

    keys = _keys(s3_server, prefix)
    for name in ("metrics.json", "oof.parquet", "test_predictions.parquet", "models/fold_0.pt",
                 "models/fold_1.pt", "models/model.json", "confusion_matrix.png", "curves.png",
                 "modality_weights.json", "history.parquet", "fold_metrics.parquet", "config.yaml"):
        assert prefix + name in keys, name
    assert storage.read_json(f"{out}/metrics.json")["waf"] == pytest.approx(metrics["waf"])
    ens = load_ensemble(out)
    assert ens.modalities == ["audio", "text"] and len(ens.models) == 2
    # resume=True on the finished S3 run returns it untouched.
    assert train_run(cfg, train_store, out, resume=True) == storage.read_json(f"{out}/metrics.json")


def test_shard_ids_partition_equally_whatever_the_order() -> None:
    ids = [f"c{i:03d}" for i in range(103)]
    parts = [shard_ids(ids, 4, r, seed=7) for r in range(4)]
    assert [len(p) for p in parts] == [25] * 4  # equal steps on every rank; 3 clips left out
    assert len(set().union(*parts)) == 100
    assert parts == [shard_ids(list(reversed(ids)), 4, r, seed=7) for r in range(4)]
    assert parts != [shard_ids(ids, 4, r, seed=8) for r in range(4)]


class _Shard:
    """A worker's dataset shard as Ray Train hands it over: ``iter_batches`` over Arrow blocks (counted)."""

    def __init__(self, table, block: int) -> None:
        self.table, self.block, self.passes = table, block, 0

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        self.passes += 1
        for s in range(0, self.table.num_rows, batch_size or self.block):
            yield self.table.slice(s, batch_size or self.block)


def test_a_group_reads_its_rows_once_and_each_fold_sees_its_own_targets() -> None:
    """One features dataset for a group of folds: a worker streams it once (cache), each fold then gets exactly
    its clips (and this rank's share of the training ones) with the fold's labels and weights, in clip order;
    without the cache every epoch streams it again and yields the same rows."""
    import numpy as np
    import pyarrow as pa

    from mer.train.worker import GroupRows, ShardBatches

    ids = [f"c{i:02d}" for i in range(20)][::-1]  # blocks in another order than the clips'
    vec = [None if i % 7 == 3 else [float(i), -float(i)] for i in range(20)][::-1]
    table = pa.table({"clip_id": ids, "audio": pa.array(vec, pa.list_(pa.float32()))})
    folds = {0: ({f"c{i:02d}": (i % 6, 0.5) for i in range(0, 10)}, {f"c{i:02d}": (i % 6, 1.0) for i in (10, 11)}),
             1: ({f"c{i:02d}": (1, 1.0) for i in range(10, 18)}, {f"c{i:02d}": (2, 1.0) for i in (0, 1, 2)})}
    needed = {c for tr, va in folds.values() for c in (*tr, *va)}
    for cache in (True, False):
        shard = _Shard(table, block=6)
        rows = GroupRows(shard, ["audio"], {"audio": 2}, needed, cache)
        for k, (train, val) in folds.items():
            keep = set(list(train)[::2])
            got = [b for _ in range(2) for b in ShardBatches(rows, train, 4, shuffle=True, keep=keep).epoch(k)]
            seen = sorted(c for b in got for c in b[0])
            assert seen == sorted([*keep, *keep])  # this rank's training clips, once per epoch
            for b_ids, x, mask, y, w in got:
                for c, xi, mi, yi, wi in zip(b_ids, x, mask, y, w):
                    i = int(c[1:])
                    assert (yi, wi) == train[c] and bool(mi[0]) == (i % 7 != 3)
                    assert list(xi) == ([float(i), -float(i)] if i % 7 != 3 else [0.0, 0.0])
            v = list(ShardBatches(rows, val, 256, shuffle=False).epoch(0))
            v_ids = [c for b in v for c in b[0]]
            assert sorted(v_ids) == sorted(val) and np.concatenate([b[3] for b in v]).tolist() == \
                [val[c][0] for c in v_ids]
            if cache:
                assert v_ids == sorted(val)  # clip order, whatever order the blocks came in
        # cached: one pass for both folds and every epoch; streamed: a pass per epoch (2 per fold) and per validation
        assert shard.passes == (1 if cache else 6)


def test_unregistered_checkpoint_directories_are_removed(tmp_path: Path) -> None:
    ray_dir = tmp_path / "ray"
    group = ray_dir / group_name([0, 2])
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_orphan", "not_a_checkpoint"):
        (group / name).mkdir(parents=True)
        (group / name / "state.json").write_text("{}")
    registered = [str(group / "checkpoint_a"), str(group / "checkpoint_b")]
    assert remove_unregistered_checkpoints(str(ray_dir), "folds_0_2", registered) == ["checkpoint_orphan"]
    assert checkpoint_dirs(str(ray_dir), "folds_0_2") == ["checkpoint_a", "checkpoint_b"]
    assert (group / "not_a_checkpoint").is_dir()


@pytest.mark.slow
def test_a_job_of_runs_restarted_mid_fit_resumes_at_its_first_unfinished_fit(
        ray_local, train_store: str, ablation, train_cfg, kill_worker, tmp_path: Path) -> None:
    """Two runs (audio alone, text alone) as one training job (mer.train.run.train_runs): four fits in one worker
    group. A worker is killed in the third fit (text, fold 0); the restarted group resumes at that fit, from its
    last checkpoint: the two audio fits are not trained again, and every fold's outputs are written once. Each
    run equals the same run trained alone (the session's ablation), bit for bit."""
    import torch

    from mer.train.run import RunRequest, train_runs

    _, ablation_dir = ablation
    marker = tmp_path / "killed.txt"
    kill = kill_worker(marker, in_epoch=3, rank=1, fold=0, fit="text.0")
    runs = {m: tmp_path / m for m in ("audio", "text")}
    job_dir = tmp_path / "job"
    metrics = train_runs(train_cfg(**{"train.max_failures": 1}), train_store,
                         [RunRequest(str(runs[m]), None, [m], m) for m in runs], job_dir=str(job_dir),
                         callbacks=[kill.callback()])
    assert marker.exists() and "killed rank 1 at epoch 3" in marker.read_text()
    audio, text = metrics
    # The fits finished before the kill were carried over by the checkpoint, not trained again.
    assert [f["resumed_from"] for f in audio["folds"]] == [[], []]
    assert {r["attempt"] for r in pq.read_table(runs["audio"] / "history.parquet").to_pylist()} == {0}
    # The killed fit resumed from its last registered checkpoint; the one after it started once, after the restart.
    assert text["folds"][0]["resumed_from"] == [faults.last_registered_epoch(marker, 3)]
    assert text["folds"][1]["resumed_from"] == []
    epochs_n = train_cfg().train.max_epochs
    for m, run in runs.items():
        assert [e for e, _ in _epochs(run, 0)] == list(range(1, epochs_n + 1)), f"{m}: every epoch once"
        # Exactly once: one model, one OOF table and one commit record per fold, nothing else.
        assert sorted(p.name for p in (run / "folds").iterdir()) == ["fold_0.json", "fold_1.json",
                                                                    "oof_0.parquet", "oof_1.parquet"]
        assert sorted(p.name for p in (run / "models").iterdir()) == ["fold_0.pt", "fold_1.pt", "model.json"]
        assert not (run / "ray").exists(), "a job's checkpoints live in its job directory"
        # The same run as trained alone (ablation: one train_run per modality), to the last bit.
        alone = ablation_dir / m
        assert _computed(run) == _computed(alone), m
        for k in (0, 1):
            ref, got = _weights(alone / "models" / f"fold_{k}.pt"), _weights(run / "models" / f"fold_{k}.pt")
            assert all(torch.equal(ref[n], got[n]) for n in ref), f"{m} fold {k} weights"
        assert pq.read_table(run / "oof.parquet").equals(pq.read_table(alone / "oof.parquet"))
    # One job: its checkpoints under the job directory, at most checkpoints_to_keep registered ones.
    (name,) = [p.name for p in job_dir.iterdir() if p.name.startswith("fits_")]
    assert 1 <= len(checkpoint_dirs(str(job_dir), name)) <= train_cfg().train.checkpoints_to_keep
    # Resumed, the finished job returns what it wrote.
    again = train_runs(train_cfg(), train_store, [RunRequest(str(runs[m]), None, [m], m) for m in runs],
                       resume=True, job_dir=str(job_dir))
    assert again == [storage.read_json(str(runs[m] / "metrics.json")) for m in runs]
