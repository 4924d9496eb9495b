"""Batch scoring from raw videos (broken ones included) and from a feature store: exactly-once, resumable."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from mer import storage
from mer.config import LABELS
from mer.data.manifest import read_manifest
from mer.extract.store import read_features


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, ray_local, tiny_config) -> tuple[object, str]:
    """A 2-fold run trained on a synthetic store whose vector sizes match the tiny encoders."""
    from mer.encoders import encoder_dims
    from mer.train import train_run
    from mer.train.synthetic import make_feature_store

    tmp = tmp_path_factory.mktemp("score")
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(
        update={"folds": 2, "max_epochs": 3, "patience": 2})})
    dims = {b: d for b, d in encoder_dims(cfg).items() if b in ("global_visual", "face", "audio", "text")}
    store = str(tmp / "store")
    make_feature_store(store, n=96, dims=dims, seed=3)
    run = str(tmp / "run")
    train_run(cfg, store, run)
    return cfg, run


def test_score_raw_videos_with_broken_inputs_then_resume(small_run, synth_root: Path, tmp_path: Path) -> None:
    from mer.score import score

    cfg, run = small_run
    manifest_uri = str(synth_root / "manifest.parquet")
    manifest = read_manifest(manifest_uri)
    out = str(tmp_path / "pred")
    first = score(cfg, run, out, manifest_uri=manifest_uri)
    preds = read_features(storage.join(out, "predictions"))
    ids = preds.column("clip_id").to_pylist()
    # every manifest row exactly once, broken inputs included
    assert sorted(ids) == sorted(manifest.column("clip_id").to_pylist())
    assert first["score"]["written"] == manifest.num_rows
    rows = {r["clip_id"]: r for r in preds.to_pylist()}
    feats = {r["clip_id"]: r for r in read_features(storage.join(out, "features"),
                                                  columns=["status", "error"]).to_pylist()}
    broken = [cid for cid, r in feats.items() if r["status"] != "ok"]
    assert len(broken) >= 4  # zero-byte, truncated, missing file, no audio, no face, empty text
    for cid in broken:
        assert rows[cid]["status"] in ("partial", "no_features"), cid
        assert rows[cid]["error"], cid
    for cid, r in rows.items():
        if r["status"] != "no_features":
            assert r["pred_label"] in LABELS
            probs = [r[f"prob_{lab}"] for lab in LABELS]
            assert sum(probs) == pytest.approx(1.0, abs=1e-4)
            assert r["confidence"] == pytest.approx(max(probs), abs=1e-6)
    assert set(preds.column("run_id").to_pylist()) == {"run"}
    sub = pacsv.read_csv(storage.join(out, "submission.csv"))
    assert sub.column_names == ["name", "discrete"] and sub.num_rows == manifest.num_rows
    assert set(sub.column("discrete").to_pylist()) <= set(LABELS)

    # Re-running a finished job resumes: nothing extracted, nothing scored twice.
    again = score(cfg, run, out, manifest_uri=manifest_uri)
    assert again["extract"]["processed"] == 0
    assert again["score"]["written"] == 0 and again["score"]["skipped_done"] == manifest.num_rows
    assert read_features(storage.join(out, "predictions")).num_rows == manifest.num_rows


def test_score_resumes_after_a_lost_part(small_run, tmp_path: Path) -> None:
    from mer.score import score, score_features

    cfg, run = small_run
    store = str(Path(run).parent / "store")
    cfg = cfg.model_copy(update={"score": cfg.score.model_copy(update={"rows_per_part": 20})})
    out = str(tmp_path / "p")
    first = score(cfg, run, out, features_uri=store)
    n = first["score"]["total"]
    parts = storage.list_files(storage.join(out, "predictions"), ".parquet")
    assert len(parts) >= 3
    lost = storage.read_table(parts[1]).num_rows
    Path(parts[1]).unlink()  # as if the job died before committing this part
    resumed = score_features(cfg, run, store, storage.join(out, "predictions"))
    assert resumed["written"] == lost and resumed["skipped_done"] == n - lost
    assert sorted(read_features(storage.join(out, "predictions")).column("clip_id").to_pylist()) == \
        sorted(read_features(store, columns=["split"]).column("clip_id").to_pylist())
