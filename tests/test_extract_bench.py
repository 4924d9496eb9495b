"""``bench_extract`` on a few generated clips with tiny models: every figure is produced and consistent."""

from __future__ import annotations

from mer.config import with_overrides
from mer.extract.bench import bench_extract


def test_bench_extract_reports_all_figures(ray_local, tiny_config, tmp_path) -> None:
    cfg = with_overrides(tiny_config, [f"extract.encoders.{b}.enabled={b in ('global_visual', 'text')}"
                                       for b in ("global_visual", "face", "audio", "text")])
    r = bench_extract(cfg, n_clips=4, workdir=str(tmp_path), clip_seconds=1.0, clip_width=160, clip_height=120,
                      gop=5, rss_decodes=20)
    assert r["clips"] == 4 and r["branches"] == ["global_visual", "text"]
    assert r["decode_only"]["uniform"]["clips"] == 4 and r["decode_only"]["keyframe"]["clips"] == 4
    assert set(r["encoder_alone"]) == {"global_visual", "text"}
    assert all(v["clips"] == 4 and v["clips_per_s"] > 0 for v in r["encoder_alone"].values())
    assert r["full_pipeline"]["clips"] == 4
    sp = r["decode_single_process"]
    assert sp["decord_uniform_ms"] > 0 and sp["decord_keyframe_ms"] > 0 and sp["pyav_keyframe_ms"] > 0
    assert r["ratio_full_over_bottleneck"] > 0 and r["decode_speedup"] > 0
    assert set(r["sequential_baseline"]["per_branch_s"]) == {"global_visual", "text"}
    assert r["speedup_vs_sequential"] > 0
    assert r["decode_rss"]["decodes"] == 20 and r["decode_rss"]["rss_mb_end"] > 10
