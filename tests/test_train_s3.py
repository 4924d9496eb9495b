"""Run directory on S3 (moto server on 127.0.0.1): Ray Train checkpoints land in the bucket, and an
interrupted run (a worker killed with no retries left) continues from them with ``resume=True``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mer import storage
from mer.train import load_ensemble, train_run
from mer.train.fold import FAULT_ENV
from mer.train.synthetic import make_feature_store, small_config

EPOCHS = 4


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mer-test", Prefix=prefix)
            for o in page.get("Contents", [])]


def test_s3_checkpoints_and_resume_after_interruption(s3_server: str, ray_local, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    features = str(tmp_path / "features")
    make_feature_store(features, n=120, dims={"audio": 8, "text": 8}, seed=2)
    prefix = f"runs/{tmp_path.name}/"
    out = f"s3://mer-test/{prefix.rstrip('/')}"
    cfg = small_config(["audio", "text"], **{"train.max_epochs": EPOCHS, "train.patience": EPOCHS,
                                             "train.max_failures": 0})
    marker = tmp_path / "killed.txt"
    # Rank 0 of fold 1 dies in epoch 3 with no retries left: the run fails after fold 0 finished.
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}:0:1")
    with pytest.raises(Exception) as failed:
        train_run(cfg, features, out)
    assert marker.exists(), f"the run failed before the injected fault: {failed.value!r}"
    keys = _keys(s3_server, prefix)
    assert prefix + "folds/fold_0.json" in keys and prefix + "folds/fold_1.json" not in keys
    assert prefix + "metrics.json" not in keys
    fold1 = [k for k in keys if k.startswith(f"{prefix}ray/fold_1/checkpoint_")]
    assert any(k.endswith("/state.json") for k in fold1), "fold 1's checkpoints are in the bucket"
    assert any("zero_pp_rank_1" in k for k in fold1), "rank 1's DeepSpeed shard uploaded too"

    monkeypatch.delenv(FAULT_ENV)
    metrics = train_run(cfg, features, out, resume=True)
    assert metrics["skipped_folds"] == [0]
    resumed = metrics["folds"][1]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] <= 2, resumed  # continued from an S3 checkpoint
    assert metrics["folds"][1]["epochs"] == EPOCHS and metrics["test"] is not None

    keys = _keys(s3_server, prefix)
    for name in ("metrics.json", "oof.parquet", "test_predictions.parquet", "models/fold_0.pt",
                 "models/fold_1.pt", "models/model.json", "confusion_matrix.png", "curves.png",
                 "modality_weights.json", "history.parquet", "fold_metrics.parquet", "config.yaml"):
        assert prefix + name in keys, name
    assert storage.read_json(f"{out}/metrics.json")["waf"] == pytest.approx(metrics["waf"])
    ens = load_ensemble(out)
    assert ens.modalities == ["audio", "text"] and len(ens.models) == 2
    # resume=True on the finished S3 run returns it untouched.
    assert train_run(cfg, features, out, resume=True) == storage.read_json(f"{out}/metrics.json")
