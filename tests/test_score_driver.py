"""Scoring a small store on the driver (``score.driver_rows_mb``), no Ray: which scorings go there, and that the
driver's path writes every clip once and resumes like the actor pool's (tests/test_score.py compares the two)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mer.config import LABELS, with_overrides
from mer.predict.score import on_driver, score_features
from mer.store import storage
from mer.store.parts import read_parts
from mer.synth.feature_store import make_feature_store, small_config
from mer.train.features import label_index, table_inputs
from mer.train.local import fit_local, write_run

DIMS = {"audio": 32, "text": 96}


def test_which_scorings_run_on_the_driver() -> None:
    cfg = small_config(list(DIMS))  # score.driver_rows_mb: 256 MiB
    row = sum(DIMS.values()) * 4  # bytes of one row's vectors
    limit = int(256 * 2**20 // row)
    assert on_driver(cfg, DIMS, limit) and not on_driver(cfg, DIMS, limit + 1)
    assert not on_driver(with_overrides(cfg, ["score.driver_rows_mb=0"]), DIMS, 1)
    assert not on_driver(with_overrides(cfg, ["score.resources.num_gpus=0.5"]), DIMS, 1)  # GPUs: the actor pool


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A generated store and a 2-fold run fitted in this process (``fit_local``): scorable like a trained run."""
    root = tmp_path_factory.mktemp("driver_score")
    store = str(root / "features")
    make_feature_store(store, n=120, dims=DIMS, seed=0, noise=2.0, missing=0.1)
    table = read_parts(store)
    table = table.filter(np.array([s == "train" for s in table.column("split").to_pylist()]))
    y = label_index(table.column("label").to_pylist())
    x, mask = table_inputs(table, list(DIMS), DIMS)
    cfg = small_config(list(DIMS), **{"train.max_epochs": 2})
    fit = fit_local(cfg.train, "ecmf", DIMS, x, mask, y, np.arange(len(y)) % 2)
    run = str(root / "run")
    write_run(run, fit, table.column("clip_id").to_pylist(), y)
    return store, run


def test_the_driver_scores_every_clip_once_and_resumes(local_run: tuple[str, str], tmp_path: Path) -> None:
    store, run = local_run
    cfg = with_overrides(small_config(list(DIMS)), ["score.rows_per_part=16", "score.resources.batch_size=10"])
    out = str(tmp_path / "pred")
    first = score_features(cfg, run, store, out)
    ids = sorted(read_parts(store, columns=[]).column("clip_id").to_pylist())
    assert first["on_driver"] and first["written"] == first["total"] == len(ids)
    preds = read_parts(out)
    assert sorted(preds.column("clip_id").to_pylist()) == ids
    for r in preds.to_pylist():
        assert r["status"] in ("ok", "partial") and r["pred_label"] in LABELS and len(r["fold_probs"]) == 2
        assert sum(r[f"prob_{lab}"] for lab in LABELS) == pytest.approx(1.0, abs=1e-5)
    parts = storage.list_files(out, ".parquet")
    assert len(parts) == -(-len(ids) // 16)
    lost = storage.read_table(parts[2]).num_rows
    Path(parts[2]).unlink()  # as if the driver died before committing this part
    again = score_features(cfg, run, store, out)
    assert again["written"] == lost and again["skipped_done"] == len(ids) - lost
    assert sorted(read_parts(out).column("clip_id").to_pylist()) == ids
