"""``mer bench extract``: where the extraction time goes, measured in ONE run on the same clips.

Figures (clips/s; "steady" rates exclude actor start-up: rows after the first output batch divided by
the time after it):

* decode only — decord's default uniform ``get_batch`` vs the configured (cheaper) sampling, both in
  one process per clip (ms/clip) and as the Ray decode stage; their ratio is the decode speedup;
* each encoder alone on pre-decoded (materialised) batches;
* the full streaming pipeline, and ``full / min(decode-only, slowest encoder)``;
* a MERTools-style sequential baseline (one model at a time, one clip at a time, each model's script
  decoding the clips itself) and the pipeline's speedup over it;
* decode-worker memory over many repeated decodes (decord leak watch), with recycling disabled.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import MerConfig, with_overrides
from mer.extract.decoders import VIDEO, DecodeParams, decode_clip
from mer.extract.decode import ClipDecoder
from mer.extract.face import FaceDetector
from mer.extract.pipeline import build_dataset, build_stages, enabled_branches, pipeline_input, read_manifest_table
from mer.extract.stages import normalize_batch, timed
from mer.stream import Stage

log = logging.getLogger("mer.extract")


def _consume(ds: Any) -> dict[str, float]:
    """Drain a dataset; total and steady-state clips/s (rows after the first batch / time after it)."""
    t0 = time.perf_counter()
    n, first_t, first_n = 0, None, 0
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += b.num_rows
        if first_t is None:
            first_t, first_n = time.perf_counter(), b.num_rows
    total = time.perf_counter() - t0
    steady_s = time.perf_counter() - first_t if first_t is not None else 0.0
    steady = (n - first_n) / steady_s if steady_s > 0 and n > first_n else (n / total if total else 0.0)
    return {"clips": n, "seconds": round(total, 2), "clips_per_s": round(n / total, 3) if total else 0.0,
            "steady_clips_per_s": round(steady, 3)}


def _drop_heavy(batch: pa.Table) -> pa.Table:
    return batch.select([c for c in batch.column_names if c in ("clip_id", "decode_status") or c.startswith("_t_")])


def _bench_clips(cfg: MerConfig, manifest_uri: str | None, n_clips: int, workdir: str, seconds: float,
                 width: int, height: int, gop: int) -> tuple[pa.Table, dict[str, Any]]:
    if manifest_uri:
        t = read_manifest_table(manifest_uri).slice(0, n_clips)
        return t, {"source": manifest_uri}
    from mer.extract.clips import make_clip_set

    t = make_clip_set(workdir, n_ok=n_clips, broken=False, seconds=seconds, width=width, height=height, gop=gop)
    for c in ("label", "split"):
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t, {"source": "generated", "seconds": seconds, "size": f"{width}x{height}", "fps": 25, "gop": gop}


def _decode_ms(paths: list[str], backend: str, params: DecodeParams) -> float:
    """Mean ms per clip of one in-process video decode (first clip is a warm-up)."""
    fn = VIDEO[backend]
    fn(paths[0], params)
    t0 = time.perf_counter()
    for p in paths:
        fn(p, params)
    return round(1000 * (time.perf_counter() - t0) / len(paths), 1)


def _rss_growth(cfg: MerConfig, paths: list[str], decodes: int) -> dict[str, Any]:
    """Decode-child RSS over ``decodes`` clips with recycling off (what an unrecycled decord worker does)."""
    dec = ClipDecoder(with_overrides(cfg, [f"extract.decode.recycle_every={10 ** 9}"]))
    samples = []
    try:
        for i in range(decodes):
            dec.decode_one(paths[i % len(paths)])
            if i % 10 == 9:
                samples.append(dec.child.rss())
    finally:
        dec.child.kill()
    if not samples:
        return {}
    mb = [s / 2**20 for s in samples]
    base = mb[min(1, len(mb) - 1)]
    slope = float(np.polyfit(np.arange(len(mb)) * 10, mb, 1)[0]) * 1000 if len(mb) >= 3 else 0.0
    return {"decodes": decodes, "rss_mb_after_20": round(base, 1), "rss_mb_end": round(mb[-1], 1),
            "rss_mb_max": round(max(mb), 1), "growth_mb": round(mb[-1] - base, 1),
            "slope_mb_per_1000_clips": round(slope, 1),
            "note": f"child recycled every {cfg.extract.decode.recycle_every} clips in the pipeline"}


def _sequential_baseline(cfg: MerConfig, table: pa.Table, branches: list[str]) -> dict[str, Any]:
    """MERTools-style: for each model, load it, then for each clip decode what it needs and encode it alone."""
    from mer.encoders import ENCODERS

    uniform = DecodeParams(**{**DecodeParams.from_config(cfg).to_dict(), "sampling": "uniform"}).to_dict()
    rows = table.to_pylist()
    t0 = time.perf_counter()
    per_branch = {}
    face = FaceDetector(cfg) if "face" in branches else None
    for b in branches:
        tb = time.perf_counter()
        enc = ENCODERS[b](cfg)
        for r in rows:
            batch: dict[str, Any] = {"clip_id": np.array([r["clip_id"]], dtype=object),
                                     "text": np.array([r.get("text") or ""], dtype=object)}
            if b in ("global_visual", "face", "audio"):
                d = decode_clip(r["video_uri"], r.get("audio_uri"), "decord", uniform,
                                want_video=b != "audio", want_audio=b == "audio")
                ok = "frames" in d or "audio" in d
                for k, v in (("frames", d.get("frames")), ("audio", d.get("audio"))):
                    col = np.empty(1, dtype=object)
                    col[0] = v
                    batch[k] = col
                batch["decode_status"] = np.array(["ok" if ok else "decode_error"], dtype=object)
                batch["audio_status"] = np.array(["ok" if d.get("audio") is not None else "no_audio"], dtype=object)
                if b == "face" and face is not None:
                    fr = face.process(d.get("frames"), batch["decode_status"][0])
                    for k, v in fr.items():
                        col = np.empty(1, dtype=object)
                        col[0] = v
                        batch[k] = col
            enc(normalize_batch(batch))
        per_branch[b] = round(time.perf_counter() - tb, 2)
        del enc
    total = time.perf_counter() - t0
    return {"seconds": round(total, 2), "clips_per_s": round(len(rows) / total, 3), "per_branch_s": per_branch}


def bench_extract(cfg: MerConfig, manifest_uri: str | None = None, *, n_clips: int = 16,
                  workdir: str | None = None, clip_seconds: float = 3.0, clip_width: int = 640,
                  clip_height: int = 360, gop: int = 25, rss_decodes: int = 200, baseline: bool = True,
                  verbose: bool = True) -> dict[str, Any]:
    """Run every measurement on the same ``n_clips`` clips (a manifest's first rows, or generated ones)."""
    import ray

    from mer.encoders import ENCODERS
    from mer.runtime import init_ray

    cfg = init_ray(cfg)
    workdir = workdir or tempfile.mkdtemp(prefix="mer-bench-extract-")
    table, clips_info = _bench_clips(cfg, manifest_uri, n_clips, workdir, clip_seconds, clip_width, clip_height, gop)
    paths = [p for p in table.column("video_uri").to_pylist() if p]
    branches = enabled_branches(cfg)
    d = cfg.extract.decode
    params = DecodeParams.from_config(cfg)
    result: dict[str, Any] = {"clips": table.num_rows, "clip_source": clips_info, "branches": branches,
                              "decode": {"backend": d.backend, "sampling": d.sampling, "num_frames": d.num_frames,
                                         "frame_size": d.frame_size, "threads": d.threads,
                                         "concurrency": d.resources.concurrency},
                              "ray_resources": ray.cluster_resources()}

    # 1. decode in one process: decord default uniform get_batch vs the configured sampling
    uni = DecodeParams(**{**params.to_dict(), "sampling": "uniform"})
    key = DecodeParams(**{**params.to_dict(), "sampling": "keyframe"})
    single = {"decord_uniform_ms": _decode_ms(paths, "decord", uni),
              "decord_keyframe_ms": _decode_ms(paths, "decord", key),
              "pyav_keyframe_ms": _decode_ms(paths, "pyav", key)}
    single["speedup_decord_keyframe"] = round(single["decord_uniform_ms"] / single["decord_keyframe_ms"], 2)
    single["speedup_pyav_keyframe"] = round(single["decord_uniform_ms"] / single["pyav_keyframe_ms"], 2)
    result["decode_single_process"] = single

    # 2. decode-only Ray stage, both samplings (same actors/resources as the pipeline)
    ra = {"max_restarts": cfg.extract.max_restarts, "max_task_retries": cfg.extract.max_task_retries}
    inp = pipeline_input(cfg, table)
    rows = cfg.extract.input_block_rows or d.resources.batch_size
    blocks = [inp.slice(i, rows) for i in range(0, inp.num_rows, rows)]

    def decode_stage(sampling: str) -> Stage:
        return Stage("decode", timed(ClipDecoder, "decode"), ClipDecoder.input_columns, ClipDecoder.output_columns,
                     resources=d.resources, constructor_args=(cfg, None, sampling), map_args=ra)

    dec_only = {}
    for sampling in ("uniform", d.sampling):
        ds = decode_stage(sampling).apply(ray.data.from_arrow(blocks))
        dec_only[sampling] = _consume(ds.map_batches(_drop_heavy, batch_format="pyarrow", num_cpus=0.0))
    result["decode_only"] = dec_only
    result["decode_speedup"] = round(dec_only[d.sampling]["steady_clips_per_s"]
                                     / max(1e-9, dec_only["uniform"]["steady_clips_per_s"]), 2)

    # 3. each encoder alone on pre-decoded batches
    pre = decode_stage(d.sampling).apply(ray.data.from_arrow(blocks))
    if "face" in branches:
        pre = Stage("face_detect", timed(FaceDetector, "face_detect"), FaceDetector.input_columns,
                    FaceDetector.output_columns, resources=cfg.extract.face.resources, constructor_args=(cfg,),
                    map_args=ra).apply(pre)
    pre = pre.materialize()
    enc_alone = {}
    for b in branches:
        r = getattr(cfg.extract.encoders, b).resources
        ds = Stage(b, timed(ENCODERS[b], b), ENCODERS[b].input_columns, ENCODERS[b].output_columns, resources=r,
                   constructor_args=(cfg,), map_args=ra).apply(pre)
        enc_alone[b] = _consume(ds.map_batches(_drop_heavy, batch_format="pyarrow", num_cpus=0.0))
    del pre
    result["encoder_alone"] = enc_alone

    # 4. the full streaming pipeline (no store writes: the driver just drains it)
    full = _consume(build_dataset(cfg, table, build_stages(cfg, extra_stages=[])))
    result["full_pipeline"] = full
    bottleneck = min([dec_only[d.sampling]["steady_clips_per_s"]]
                     + [v["steady_clips_per_s"] for v in enc_alone.values()])
    result["bottleneck_clips_per_s"] = bottleneck
    result["ratio_full_over_bottleneck"] = round(full["steady_clips_per_s"] / max(1e-9, bottleneck), 3)

    # 5. MERTools-style sequential baseline
    if baseline:
        seq = _sequential_baseline(cfg, table, branches)
        result["sequential_baseline"] = seq
        result["speedup_vs_sequential"] = round(full["clips_per_s"] / max(1e-9, seq["clips_per_s"]), 2)

    # 6. decode worker memory over many decodes
    if rss_decodes:
        result["decode_rss"] = _rss_growth(cfg, paths, rss_decodes)
    if verbose:
        print(format_bench(result), flush=True)
    return result


def format_bench(r: dict[str, Any]) -> str:
    """The bench as a table."""
    lines = [f"bench extract: {r['clips']} clips ({r['clip_source']}), branches {r['branches']}, decode {r['decode']}",
             f"{'measurement':<44}{'clips/s':>10}{'steady':>10}{'seconds':>10}"]

    def row(name: str, v: dict[str, Any]) -> None:
        lines.append(f"{name:<44}{v['clips_per_s']:>10}{v['steady_clips_per_s']:>10}{v['seconds']:>10}")

    for s, v in r["decode_only"].items():
        row(f"decode only ({'decord default uniform get_batch' if s == 'uniform' else s})", v)
    for b, v in r["encoder_alone"].items():
        row(f"encoder alone: {b}", v)
    row("full pipeline", r["full_pipeline"])
    sp = r["decode_single_process"]
    lines.append(f"decode ms/clip in one process: decord uniform {sp['decord_uniform_ms']}, decord keyframe "
                 f"{sp['decord_keyframe_ms']} (x{sp['speedup_decord_keyframe']}), pyav keyframe "
                 f"{sp['pyav_keyframe_ms']} (x{sp['speedup_pyav_keyframe']})")
    lines.append(f"decode-stage speedup over decord default: x{r['decode_speedup']}")
    lines.append(f"full / min(decode-only, slowest encoder) = {r['ratio_full_over_bottleneck']} "
                 f"(bottleneck {r['bottleneck_clips_per_s']} clips/s)")
    if "sequential_baseline" in r:
        s = r["sequential_baseline"]
        lines.append(f"MERTools-style sequential baseline: {s['clips_per_s']} clips/s ({s['seconds']} s, per model "
                     f"{s['per_branch_s']}); pipeline speedup x{r['speedup_vs_sequential']}")
    if r.get("decode_rss"):
        m = r["decode_rss"]
        lines.append(f"decode child RSS over {m['decodes']} decodes (no recycling): {m['rss_mb_after_20']} → "
                     f"{m['rss_mb_end']} MB (max {m['rss_mb_max']}, {m['slope_mb_per_1000_clips']} MB/1000 clips)")
    return "\n".join(lines)
