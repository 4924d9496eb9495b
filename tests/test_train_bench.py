"""``mer bench train``'s table and the runs it measures (no training here: the figures are given)."""

from __future__ import annotations

from mer.bench.train import format_bench, source_runs
from mer.config import load_config, with_overrides
from mer.store.parts import PartStore
from mer.synth.feature_store import make_feature_store


def test_the_table_shows_ratio_overhead_split_and_the_job() -> None:
    r = {"model": "ecmf", "n_cv": 120, "folds": 3, "epochs": [8, 9, 11], "workers": 1, "zero_stage": 2,
         "modalities": ["audio"], "run_s": 60.0, "fits_s": 10.0, "floor_s": 4.0,
         "floor": {"load_s": 0.5, "folds_s": [1.0, 1.2, 1.3]}, "run_over_floor": 15.0, "overhead_s": 50.0,
         "startup": {"prepare_s": 9.0, "worker_group_s": 20.0, "imports_s": 2.0, "data_to_workers_s": 1.0,
                     "engine_s": 6.0, "finish_s": 10.0},
         "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 1.0, 1.0],
         "service": {"target_s": 18.0, "runs": [
             {"run_s": 30.0, "fits_s": 10.0, "over_floor": 7.5, "worker_group_s": 12.0, "cv_waf_mean": 0.8},
             {"run_s": 12.5, "fits_s": 10.0, "over_floor": 3.125, "worker_group_s": 0.0, "cv_waf_mean": 0.8}]},
         "job": {"runs": {"fused": ["audio", "text"], "audio": ["audio"]}, "floor_s": 8.0,
                 "job": {"wall_s": 80.0, "fits_s": 20.0, "overhead_s": 60.0, "over_floor": 10.0,
                         "loadavg_before": [1.0, 1.0, 1.0]},
                 "separate": {"wall_s": 160.0, "fits_s": 20.0, "overhead_s": 140.0, "over_floor": 20.0,
                              "loadavg_before": [1.0, 1.0, 1.0]}}}
    text = format_bench(r)
    assert "run / floor" in text and "15.00 x" in text
    assert "overhead = run - fits" in text and "50.0 s" in text
    for label in ("worker group start", "DeepSpeed engines", "data to the workers", "driver preparation"):
        assert label in text
    assert "separate / job" in text and "2.00 x" in text
    # the same run on a fit service: the first starts its groups, the next finds them up; each against the target
    lines = text.splitlines()
    first = next(x for x in lines if "first run (groups start)" in x)
    again = next(x for x in lines if "run 2 (groups up)" in x)
    assert "7.50x floor" in first and first.endswith("not met")
    assert "3.12x floor" in again and again.endswith(": met")
    assert "2 x floor + 10 s = 18.0 s" in text


def test_the_job_is_the_label_loops_sources(tmp_path) -> None:
    make_feature_store(str(tmp_path / "f"), n=30, dims={"audio": 4, "text": 3, "face": 2}, seed=0)
    cfg = with_overrides(load_config(), ["train.modalities=[audio,text,face,global_visual]",
                                         "labels.source_modalities=[audio,face]"])
    assert source_runs(cfg, PartStore(str(tmp_path / "f"))) == {"fused": ["audio", "text", "face"],
                                                               "audio": ["audio"], "face": ["face"]}
