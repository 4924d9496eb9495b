"""Training with the run directory on S3 (moto server on 127.0.0.1): Ray Train checkpoints land in the bucket."""

from __future__ import annotations

from pathlib import Path

import pytest

from mer import storage
from mer.train import load_ensemble, train_run
from mer.train.synthetic import make_feature_store, small_config


def test_s3_run_directory_and_checkpoints(s3_server: str, ray_local, tmp_path: Path) -> None:
    import boto3

    features = str(tmp_path / "features")
    make_feature_store(features, n=120, dims={"audio": 8, "text": 8}, seed=2)
    out = f"s3://mer-test/runs/{tmp_path.name}"
    cfg = small_config(["audio", "text"], **{"train.max_epochs": 3, "train.patience": 3})
    metrics = train_run(cfg, features, out)
    assert metrics["test"] is not None and len(metrics["folds"]) == 2

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="mer-test", Prefix=f"runs/{tmp_path.name}/") for o in page.get("Contents", [])]
    prefix = f"runs/{tmp_path.name}/"
    for fold in (0, 1):
        ckpt = [k for k in keys if k.startswith(f"{prefix}ray/fold_{fold}/checkpoint_")]
        assert any(k.endswith("/state.json") for k in ckpt), f"fold {fold}: no checkpoint in the bucket"
        assert any("zero_pp_rank_1" in k for k in ckpt), "rank 1's DeepSpeed shard uploaded too"
    for name in ("metrics.json", "oof.parquet", "test_predictions.parquet", "models/fold_0.pt",
                 "models/model.json", "confusion_matrix.png", "curves.png", "modality_weights.json"):
        assert prefix + name in keys, name
    assert storage.read_json(f"{out}/metrics.json")["waf"] == pytest.approx(metrics["waf"])
    ens = load_ensemble(out)
    assert ens.modalities == ["audio", "text"] and len(ens.models) == 2
    # resume=True on the finished S3 run returns it untouched.
    assert train_run(cfg, features, out, resume=True) == storage.read_json(f"{out}/metrics.json")
