"""``bench_extract`` on a few generated clips with tiny models: every figure is produced and consistent."""

from __future__ import annotations

import pytest

from mer.bench.extract import bench_extract, format_bench
from mer.config import with_overrides

# make check leaves the module out: the bench runs the pipeline several times over
pytestmark = pytest.mark.slow


def test_bench_extract_reports_all_figures(ray_local, tiny_config, tmp_path) -> None:
    cfg = with_overrides(tiny_config, [f"extract.encoders.{b}.enabled={b in ('global_visual', 'face')}"
                                       for b in ("global_visual", "face", "audio", "text")])
    r = bench_extract(cfg, n_clips=4, workdir=str(tmp_path), clip_seconds=1.0, clip_width=160, clip_height=120,
                      gop=5, rss_decodes=20, ray_init_s=1.5, verbose=False, decode_pairs=2)
    assert r["clips"] == 4 and r["branches"] == ["global_visual", "face"]
    assert r["decode_only"]["uniform"]["clips"] == 4 and r["decode_only"]["keyframe"]["clips"] == 4
    # face detection is measured on its own, next to each encoder
    assert set(r["stage_alone"]) == {"face_detect", "global_visual", "face"}
    assert all(v["clips"] == 4 and v["clips_per_s"] > 0 for v in r["stage_alone"].values())
    for where in ("driver", "ray_worker"):
        sp = r["decode_single_process"][where]
        assert sp["decord_uniform"]["ms"] > 0 and sp["decord_keyframe"]["cpu_ms"] > 0
        assert sp["configured_with_audio"]["ms"] > 0 and r["decode_stage_over_single_process"][where] > 0
    assert r["decode_single_process"]["driver"]["pyav_keyframe"]["ms"] > 0
    # paired (one-process, stage) runs: the first pair is the runs above, the median lies among the ratios
    pairs = r["decode_stage_pairs"]
    assert len(pairs["ratio_with_audio"]) == len(pairs["reference_ms"]) == 2 and all(x > 0 for x in pairs["stage_rate"])
    assert pairs["ratio_with_audio"][0] == r["decode_stage_over_single_process"]["ray_worker_with_audio"]
    assert min(pairs["ratio_with_audio"]) <= pairs["median_with_audio"] <= max(pairs["ratio_with_audio"])
    # the decode stage's CPU includes its decode child (more than the actor's own share)
    assert r["decode_only"]["keyframe"]["stages"]["decode"]["cpu_ms_per_row"] > 0
    assert r["decode_cpu_efficiency"]["video_over_stage"] > 0 and r["decode_speedup"] > 0 and r["decode_speedup_cpu"] > 0
    full = r["full_pipeline"]
    assert full["clips"] == 4
    assert set(full["stages"]) == {"decode", "face_detect", "global_visual", "face"}
    assert all(0 < v["busy_fraction"] <= 1.0 and v["busy_ms_per_row"] > 0 and len(v["actors"]) == 1
               for v in full["stages"].values()), full["stages"]
    fr = full["first_row"]
    assert fr["ray_init_s"] == 1.5 and fr["last_actor_stage"] in full["stages"]
    assert 0 < fr["last_actor_ready_s"] <= fr["seconds"] and fr["its_init_s"] >= 0
    lim = r["limits"]
    assert set(lim["rates"]) == {"decode", "face_detect", "global_visual", "face"}
    assert lim["shared_limit"] < lim["min_rate"] == min(lim["rates"].values())
    assert lim["cpu_limit"] > 0 and r["ratio_full_over_shared_limit"] > 0
    assert set(r["sequential_baseline"]["per_branch_s"]) == {"global_visual", "face"}
    assert r["speedup_vs_sequential"] > 0
    rss = r["decode_rss"]
    assert rss["pyav"]["decodes"] == 20 and rss["pyav"]["rss_mb_end"] > 10 and rss["decord"]["decodes"] == 20
    # the child's CPU splits into the decode itself and the protocol around it; the child's total comes from
    # /proc (whole clock ticks), the decode part from process_time, so they agree to one tick over the decodes
    import os

    tick_ms_per_decode = 1000 / os.sysconf("SC_CLK_TCK") / rss["pyav"]["decodes"]
    assert 0 < rss["pyav"]["decode_cpu_ms"] <= rss["pyav"]["child_cpu_ms"] + tick_ms_per_decode
    text = format_bench(r)
    assert "1/sum(1/rate_i)" in text and "time to first row" in text and "busy fraction" in text
    assert "2 paired runs" in text
