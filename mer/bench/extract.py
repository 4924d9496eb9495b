"""``mer bench extract``: where the extraction time goes, measured in ONE run on the same clips.

Figures (clips/s; "steady" rates exclude start-up: rows after the first output batch divided by the time
after it; CPU ms/clip count every thread of a stage's actor plus the decode child):

* decode in one process — decord's default uniform ``get_batch`` vs keyframe sampling (ms/clip), in the
  driver and in a Ray worker (Ray runs workers at nice 15: on a machine shared with other jobs the
  driver gets more of the CPU than any stage, so the worker figure is the like-for-like reference);
* the decode stage alone (one decode actor), both samplings, and its rate over the one-process one;
* face detection alone, the speech and description stages alone when on (``text.source`` asr/auto,
  ``extract.describe``: rows/s and generated tokens per busy second), and each encoder alone, on pre-decoded
  (materialised) batches;
* the full streaming pipeline: end to end, steady, time to the first row and its parts (Ray init, actor
  process start, imports, ``__init__``/model load, the first batch through the chain), busy fraction of
  each stage;
* the limits it is compared with: ``min(rate_i)`` (stages on their own hardware, e.g. GPU encoders next to
  CPU decode), ``1/Σ(1/rate_i)`` (every stage alone used the same shared resource), and
  ``cpus / Σ cpu_i`` (stages that each use less than the machine, sharing its CPUs);
* a MERTools-style sequential baseline (one model at a time, one clip at a time, each model's script
  decoding the clips itself) in one Ray worker holding a node's CPUs (and one GPU when the encoders ask
  for GPUs), and the pipeline's speedup over it;
* decode-child memory over many decodes with recycling off, with the configured audio decoder and with
  decord's (where the growth comes from).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mer.bench.rss import bench_rss, format_rss
from mer.config import MerConfig, describes, enabled_branches, gpu_requests, transcribes, with_overrides
from mer.encoders import ENCODERS
from mer.extract.columns import normalize_batch
from mer.extract.decode import ClipDecoder
from mer.extract.decoders import AUDIO, VIDEO, DecodeParams, decode_clip
from mer.extract.face import FaceDetector
from mer.extract.pipeline import (branch_stage, build_dataset, build_stages, decode_stage, describe_stage, face_stage,
                                  pipeline_input, read_manifest_table, transcribe_stage)
from mer.extract.timing import StageTimes, is_timing
from mer.runtime.session import init_ray
from mer.synth.clips import make_clip_set

log = logging.getLogger("mer.extract")


def cpu_pressure() -> dict[str, float] | None:
    """Linux PSI: share of time runnable tasks waited for a CPU (avg10/avg60, %); None where unavailable.

    Tens of percent mean other jobs share the machine and every wall-clock figure is stretched."""
    try:
        with open("/proc/pressure/cpu") as f:
            parts = dict(p.split("=") for p in f.readline().split()[1:])
        return {"some_avg10": float(parts["avg10"]), "some_avg60": float(parts["avg60"])}
    except (OSError, KeyError, ValueError):
        return None


def _drain(ds: Any, concurrency: dict[str, int] | None = None) -> dict[str, Any]:
    """Drain a dataset: clips/s end to end and steady (rows after the first batch / time after it), and
    the stages' timing summary (:class:`StageTimes`)."""
    t0 = time.perf_counter()
    times = StageTimes(time.time())
    first_t, first_n = None, 0
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        times.add(b)
        if first_t is None:
            first_t, first_n = time.perf_counter(), b.num_rows
    end = time.perf_counter()
    n, total = times.rows, end - t0
    steady_s = end - first_t if first_t is not None else 0.0
    steady = (n - first_n) / steady_s if steady_s > 0 and n > first_n else (n / total if total else 0.0)
    s = times.summary(concurrency)
    return {"clips": n, "seconds": round(total, 2), "clips_per_s": round(n / total, 3) if total else 0.0,
            "steady_clips_per_s": round(steady, 3), "first_row": s["first_row"], "stages": s["stages"]}


def _stage_rate(run: dict[str, Any], key: str) -> float:
    """A stage-alone run's steady rate from the stage's own batch times (the driver's view when unknown)."""
    return (run["stages"].get(key) or {}).get("steady_rows_per_s") or run["steady_clips_per_s"]


def _keep_light(batch: pa.Table) -> pa.Table:
    return batch.select([c for c in batch.column_names if c in ("clip_id", "decode_status") or is_timing(c)])


def _bench_clips(cfg: MerConfig, manifest_uri: str | None, n_clips: int, workdir: str, seconds: float,
                 width: int, height: int, gop: int) -> tuple[pa.Table, dict[str, Any]]:
    if manifest_uri:
        t = read_manifest_table(manifest_uri).slice(0, n_clips)
        return t, {"source": manifest_uri}

    t = make_clip_set(workdir, n_ok=n_clips, broken=False, seconds=seconds, width=width, height=height, gop=gop)
    if transcribes(cfg):  # no subtitles: the speech stage transcribes every generated clip (text.source auto too)
        t = t.set_column(t.column_names.index("text"), "text", pa.nulls(t.num_rows, pa.string()))
    for c in ("label", "split"):
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t, {"source": "generated", "seconds": seconds, "size": f"{width}x{height}", "fps": 25, "gop": gop}


def decode_reference(paths: list[str], params: dict[str, Any], backend: str,
                     audio_backend: str | None = None) -> dict[str, float]:
    """ms/clip (wall and CPU) of decoding ``paths`` in this process: video with ``backend``, plus audio with
    ``audio_backend`` when given (the first clip is a warm-up)."""
    p = DecodeParams(**params)

    def one(path: str) -> None:
        VIDEO[backend](path, p)
        if audio_backend:
            AUDIO[audio_backend](path, p)

    one(paths[0])
    t0, c0 = time.perf_counter(), time.process_time()
    for path in paths:
        one(path)
    n = len(paths)
    return {"ms": round(1000 * (time.perf_counter() - t0) / n, 1), "cpu_ms": round(1000 * (time.process_time() - c0) / n, 1)}


def _rss_growth(cfg: MerConfig, paths: list[str], decodes: int, audio_backend: str) -> dict[str, Any]:
    """Decode-child RSS over ``decodes`` clips with recycling off (what an unrecycled decoder does)."""
    dec = ClipDecoder(with_overrides(cfg, [f"extract.decode.recycle_every={10 ** 9}",
                                           f"extract.decode.audio_backend={audio_backend}"]))
    samples = []
    try:
        dec.decode_one(paths[0])  # the child's start-up is not a decode
        cpu0, work0 = dec.child.cpu_s(), dec.child.work_cpu_s
        for i in range(decodes):
            dec.decode_one(paths[i % len(paths)])
            if i % 10 == 9:
                samples.append(dec.child.rss())
        child_ms = 1000 * (dec.child.cpu_s() - cpu0) / max(1, decodes)
        work_ms = 1000 * (dec.child.work_cpu_s - work0) / max(1, decodes)
    finally:
        dec.child.kill()
    if not samples:
        return {}
    mb = [s / 2**20 for s in samples]
    base = mb[min(1, len(mb) - 1)]
    slope = float(np.polyfit(np.arange(len(mb)) * 10, mb, 1)[0]) * 1000 if len(mb) >= 3 else 0.0
    # the child's CPU per clip: inside decode_clip, and the rest (reading requests, sending frames)
    return {"audio_backend": audio_backend, "decodes": decodes, "child_cpu_ms": round(child_ms, 2),
            "decode_cpu_ms": round(work_ms, 2), "protocol_cpu_ms": round(child_ms - work_ms, 2),
            "rss_mb_after_20": round(base, 1),
            "rss_mb_end": round(mb[-1], 1), "rss_mb_max": round(max(mb), 1), "growth_mb": round(mb[-1] - base, 1),
            "slope_mb_per_1000_clips": round(slope, 1)}


def sequential_baseline(cfg: MerConfig, table: pa.Table, branches: list[str]) -> dict[str, Any]:
    """MERTools-style: for each model, load it, then for each clip decode what it needs and encode it alone.

    Run in a fresh interpreter (:func:`_fresh_sequential_baseline`) and timed from before its imports, as the
    pipeline's end-to-end time includes its actors' imports: torch and transformers load lazily inside the first
    model's load (in ``per_branch_s``); ``import_s`` is the rest (mer's encoder registry, OpenCV)."""
    t0 = time.perf_counter()

    uniform = DecodeParams(**{**DecodeParams.from_config(cfg).to_dict(), "sampling": "uniform"}).to_dict()
    rows = table.to_pylist()
    per_branch = {}
    face = FaceDetector(cfg) if "face" in branches else None
    import_s = time.perf_counter() - t0

    def obj(v: Any) -> np.ndarray:
        col = np.empty(1, dtype=object)
        col[0] = v
        return col

    for b in branches:
        tb = time.perf_counter()
        enc = ENCODERS[b](cfg)
        for r in rows:
            batch: dict[str, Any] = {"clip_id": obj(r["clip_id"]), "text": obj(r.get("text") or "")}
            if b in ("global_visual", "face", "audio"):
                d = decode_clip(r["video_uri"], r.get("audio_uri"), "decord", uniform,
                                want_video=b != "audio", want_audio=b == "audio")
                ok = "frames" in d or "audio" in d
                batch["frames"], batch["audio"] = obj(d.get("frames")), obj(d.get("audio"))
                batch["decode_status"] = obj("ok" if ok else "decode_error")
                batch["audio_status"] = obj("ok" if d.get("audio") is not None else "no_audio")
                if b == "face" and face is not None:
                    for k, v in face.process(d.get("frames"), batch["decode_status"][0]).items():
                        batch[k] = obj(v)
            enc(normalize_batch(batch))
        per_branch[b] = round(time.perf_counter() - tb, 2)
        del enc
    total = time.perf_counter() - t0
    return {"seconds": round(total, 2), "clips_per_s": round(len(rows) / total, 3), "per_branch_s": per_branch,
            "import_s": round(import_s, 2)}


def _fresh_sequential_baseline(cfg: MerConfig, table: pa.Table, branches: list[str]) -> dict[str, Any]:
    """:func:`sequential_baseline` in a new interpreter, so that it imports torch and transformers itself like
    a script would (a reused Ray worker may have them already)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(sequential_baseline, (cfg, table, branches))


def _limits(alone: dict[str, dict[str, Any]], cpus: float) -> dict[str, Any]:
    """The rates a full pipeline is compared with, from each stage's steady rate and CPU ms/clip alone."""
    rates = {k: _stage_rate(v, k) for k, v in alone.items() if _stage_rate(v, k) > 0}
    cpu_ms = {k: (v["stages"].get(k) or {}).get("steady_cpu_ms_per_row")
              or (v["stages"].get(k) or {}).get("cpu_ms_per_row", 0.0) for k, v in alone.items()}
    out: dict[str, Any] = {"rates": rates, "cpu_ms_per_clip": cpu_ms}
    if rates:
        slowest = min(rates, key=rates.get)
        out.update({"min_rate": rates[slowest], "slowest_stage": slowest,
                    "shared_limit": round(1.0 / sum(1.0 / r for r in rates.values()), 3)})
    if sum(cpu_ms.values()) > 0:
        out["cpu_limit"] = round(cpus * 1000.0 / sum(cpu_ms.values()), 3)
    return out


def bench_extract(cfg: MerConfig, manifest_uri: str | None = None, *, n_clips: int = 16,
                  workdir: str | None = None, clip_seconds: float = 3.0, clip_width: int = 640,
                  clip_height: int = 360, gop: int = 25, rss_decodes: int = 200, baseline: bool = True,
                  ray_init_s: float | None = None, verbose: bool = True, decode_pairs: int = 3) -> dict[str, Any]:
    """Run every measurement on the same ``n_clips`` clips (a manifest's first rows, or generated ones).

    ``ray_init_s``: how long the caller's ``ray.init`` took (part of the time to the first row).
    ``decode_pairs``: paired (one-process, one-actor stage) decode runs whose median ratio is reported.
    """
    import ray

    t = time.perf_counter()
    initialised = ray.is_initialized()
    cfg = init_ray(cfg)
    if not initialised:
        ray_init_s = time.perf_counter() - t
    workdir = workdir or tempfile.mkdtemp(prefix="mer-bench-extract-")
    table, clips_info = _bench_clips(cfg, manifest_uri, n_clips, workdir, clip_seconds, clip_width, clip_height, gop)
    paths = [p for p in table.column("video_uri").to_pylist() if p]
    branches = enabled_branches(cfg)
    d = cfg.extract.decode
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    result: dict[str, Any] = {"clips": table.num_rows, "clip_source": clips_info, "branches": branches,
                              "decode": {"backend": d.backend, "audio_backend": d.audio_backend,
                                         "sampling": d.sampling, "num_frames": d.num_frames,
                                         "frame_size": d.frame_size, "threads": d.threads,
                                         "concurrency": d.resources.concurrency, "num_cpus": d.resources.num_cpus,
                                         "max_concurrent_calls": d.resources.max_concurrent_calls},
                              "ray_resources": ray.cluster_resources(), "cpu_pressure_start": cpu_pressure()}

    # 1. decode in one process (driver, and a Ray worker like the stage's): decord uniform vs keyframe
    params = DecodeParams.from_config(cfg).to_dict()
    uni, key = {**params, "sampling": "uniform"}, {**params, "sampling": "keyframe"}
    in_worker = ray.remote(num_cpus=d.resources.num_cpus)(decode_reference)
    single = {"driver": {"decord_uniform": decode_reference(paths, uni, "decord"),
                         "decord_keyframe": decode_reference(paths, key, "decord"),
                         "pyav_keyframe": decode_reference(paths, key, "pyav"),
                         "configured_with_audio": decode_reference(paths, params, d.backend, d.audio_backend)},
              "ray_worker": {"decord_uniform": ray.get(in_worker.remote(paths, uni, "decord")),
                             "decord_keyframe": ray.get(in_worker.remote(paths, key, "decord")),
                             "configured_with_audio": ray.get(in_worker.remote(paths, params, d.backend,
                                                                                d.audio_backend))}}
    for where in single.values():
        where["speedup_keyframe"] = round(where["decord_uniform"]["ms"] / where["decord_keyframe"]["ms"], 2)
    result["decode_single_process"] = single

    # 2. decode-only Ray stage, both samplings (mer extract's stage: same actors/resources as the pipeline)
    inp = pipeline_input(cfg, table)
    rows = cfg.extract.input_block_rows or d.resources.batch_size
    blocks = [inp.slice(i, rows) for i in range(0, inp.num_rows, rows)]

    def decode_alone(sampling: str) -> dict[str, Any]:
        # mer extract's decode stage with ONE decode actor (the pool's unit) against the same decoder in one
        # process: a pool of several would divide by a one-process rate it does not share, and on a small
        # machine its actors compete for the cores
        one = with_overrides(cfg, [f"extract.decode.sampling={sampling}", "extract.decode.resources.concurrency=1"])
        ds = decode_stage(one).apply(ray.data.from_arrow(blocks))
        return _drain(ds.map_batches(_keep_light, batch_format="pyarrow", num_cpus=0.0), {"decode": 1})

    dec_only = {sampling: decode_alone(sampling) for sampling in ("uniform", d.sampling)}
    result["decode_only"] = dec_only
    rate = _stage_rate(dec_only[d.sampling], "decode")
    result["decode_stage_rate"] = {s: _stage_rate(v, "decode") for s, v in dec_only.items()}
    result["decode_speedup"] = round(rate / max(1e-9, _stage_rate(dec_only["uniform"], "decode")), 2)
    # the stage (video + audio, one actor pool) over the same sampling's video decode in one process
    ref = "decord_keyframe" if d.sampling == "keyframe" else "decord_uniform"
    result["decode_stage_over_single_process"] = {
        f"{where}{'_with_audio' if audio else ''}": round(
            rate * single[where]["configured_with_audio" if audio else ref]["ms"] / 1000, 3)
        for where in ("driver", "ray_worker") for audio in (False, True)}
    # The same ratio over paired runs, each a one-process decode in a Ray worker and then the one-actor stage,
    # back to back: a single ~3 s run of 96 clips swings by +-0.1 with other load on a small machine, and a pair
    # measured together shares it. The first pair is the runs above.
    pairs = [(single["ray_worker"]["configured_with_audio"]["ms"], rate)]
    for _ in range(max(0, decode_pairs - 1)):
        ref_ms = ray.get(in_worker.remote(paths, params, d.backend, d.audio_backend))["ms"]
        pairs.append((ref_ms, _stage_rate(decode_alone(d.sampling), "decode")))
    ratios = [round(r * ms / 1000, 3) for ms, r in pairs]
    result["decode_stage_pairs"] = {"reference_ms": [ms for ms, _ in pairs], "stage_rate": [r for _, r in pairs],
                                    "ratio_with_audio": ratios, "median_with_audio": float(np.median(ratios))}
    # CPU per clip (robust to other jobs on the machine): one-process decode over the stage's steady CPU
    # (decode child + every thread of the actor), i.e. the rate ratio the two would have on equal CPU
    # With a core to spare the decode child bounds the stage (the actor's share runs beside it); with every
    # core busy, child + actor do.
    st = dec_only[d.sampling]["stages"].get("decode", {})
    stage_cpu = st.get("steady_cpu_ms_per_row") or st.get("cpu_ms_per_row") or 0.0
    child_cpu = st.get("steady_helper_cpu_ms_per_row") or stage_cpu
    video, both = single["ray_worker"][ref]["cpu_ms"], single["ray_worker"]["configured_with_audio"]["cpu_ms"]
    uni_st = dec_only["uniform"]["stages"].get("decode", {})
    uni_child = uni_st.get("steady_helper_cpu_ms_per_row") or uni_st.get("cpu_ms_per_row") or 0.0
    result["decode_speedup_cpu"] = round(uni_child / max(1e-9, child_cpu), 2)  # uniform over configured, child CPU
    result["decode_cpu_efficiency"] = {
        "stage_cpu_ms": stage_cpu, "child_cpu_ms": child_cpu,
        "video_over_child": round(video / max(1e-9, child_cpu), 3),
        "video_over_stage": round(video / max(1e-9, stage_cpu), 3),
        "video_audio_over_stage": round(both / max(1e-9, stage_cpu), 3)}

    # 3. face detection and each encoder alone, on pre-decoded batches
    pre = decode_stage(cfg).apply(ray.data.from_arrow(blocks)).materialize()
    faces = face_stage(cfg)
    alone: dict[str, dict[str, Any]] = {"decode": dec_only[d.sampling]}
    if "face" in branches:
        alone["face_detect"] = _drain(faces.apply(pre).map_batches(_keep_light, batch_format="pyarrow", num_cpus=0.0))
        pre = faces.apply(pre).materialize()
    # the generation stages alone (no cache: every row generated), each on the decoded rows
    for key, on, make in (("asr", transcribes(cfg), transcribe_stage), ("describe", describes(cfg), describe_stage)):
        if on:
            alone[key] = _drain(make(cfg).apply(pre).map_batches(_keep_light, batch_format="pyarrow", num_cpus=0.0))
    for b in branches:
        ds = branch_stage(cfg, b).apply(pre)
        alone[b] = _drain(ds.map_batches(_keep_light, batch_format="pyarrow", num_cpus=0.0))
    del pre
    result["stage_alone"] = {k: v for k, v in alone.items() if k != "decode"}

    # 4. the full streaming pipeline (no store writes: the driver just drains it)
    stages = build_stages(cfg, extra_stages=[])
    concurrency = {s.name: (s.resources.concurrency if s.resources else 1) for s in stages}
    full = _drain(build_dataset(cfg, table, stages), concurrency)
    if full["first_row"] is not None:
        full["first_row"]["ray_init_s"] = round(ray_init_s, 2) if ray_init_s is not None else None
    result["full_pipeline"] = full
    lim = _limits(alone, cpus)
    result["limits"] = lim
    for name in ("min_rate", "shared_limit", "cpu_limit"):
        if name in lim:
            result[f"ratio_full_over_{name}"] = round(full["steady_clips_per_s"] / max(1e-9, lim[name]), 3)

    # 5. MERTools-style sequential baseline: one Ray worker holding a whole node's CPUs (and a GPU when the
    # encoders ask for GPUs), so it runs at the stages' priority, as one script on one machine would
    if baseline:
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=cpus)
        gpu = 1.0 if gpu_requests(cfg) and ray.cluster_resources().get("GPU") else 0.0
        seq_task = ray.remote(num_cpus=node_cpus, num_gpus=gpu)(_fresh_sequential_baseline)
        seq = ray.get(seq_task.remote(cfg, table, branches))
        seq["where"] = f"one Ray worker, {node_cpus:g} CPUs, {gpu:g} GPU"
        result["sequential_baseline"] = seq
        result["speedup_vs_sequential"] = round(full["clips_per_s"] / max(1e-9, seq["clips_per_s"]), 2)

    # 6. decode-child memory over many decodes, configured audio decoder vs decord's
    if rss_decodes:
        result["decode_rss"] = {ab: _rss_growth(cfg, paths, rss_decodes, ab)
                                for ab in dict.fromkeys((d.audio_backend, "decord"))}
        result["decode_rss"]["recycle_every"] = d.recycle_every
    result["cpu_pressure_end"] = cpu_pressure()
    if verbose:
        print(format_bench(result), flush=True)
    return result


def format_bench(r: dict[str, Any]) -> str:
    """The bench as a table."""
    lines = [f"bench extract: {r['clips']} clips ({r['clip_source']}), branches {r['branches']}, decode {r['decode']}",
             f"{'measurement':<46}{'clips/s':>9}{'steady':>9}{'seconds':>9}{'cpu ms/clip':>13}{'tokens/s':>10}"]

    def row(name: str, v: dict[str, Any], key: str | None = None) -> None:
        # a stage alone: its steady rate from its own batches; the full pipeline: rows reaching the driver;
        # tokens/s: a generation stage's tokens per second it was busy
        cpu = sum(s["cpu_ms_per_row"] for k, s in v["stages"].items() if key is None or k == key)
        steady = _stage_rate(v, key) if key else v["steady_clips_per_s"]
        tps = (v["stages"].get(key) or {}).get("tokens_per_busy_s") if key in ("asr", "describe") else None
        lines.append(f"{name:<46}{v['clips_per_s']:>9}{steady:>9}{v['seconds']:>9}{round(cpu, 1):>13}"
                     f"{tps if tps is not None else '':>10}")

    for s, v in r["decode_only"].items():
        row(f"decode stage only ({'decord default uniform get_batch' if s == 'uniform' else s})", v, "decode")
    for b, v in r["stage_alone"].items():
        row(f"alone: {b}{' (detection)' if b == 'face_detect' else ''}", v, b)
    row("full pipeline", r["full_pipeline"])
    for where, sp in r["decode_single_process"].items():
        lines.append(f"decode in one process ({where}), ms/clip (cpu): decord uniform {sp['decord_uniform']['ms']} "
                     f"({sp['decord_uniform']['cpu_ms']}), decord keyframe {sp['decord_keyframe']['ms']} "
                     f"({sp['decord_keyframe']['cpu_ms']}) x{sp['speedup_keyframe']}; configured video+audio "
                     f"{sp['configured_with_audio']['ms']} ({sp['configured_with_audio']['cpu_ms']})")
    ratio = r["decode_stage_over_single_process"]
    lines.append(f"decode stage steady (its own batches) {r['decode_stage_rate']} clips/s; over one-process video "
                 f"decode: {ratio['driver']} (driver), {ratio['ray_worker']} (Ray worker); over one-process video+audio: "
                 f"{ratio['driver_with_audio']} / {ratio['ray_worker_with_audio']}; stage keyframe speedup "
                 f"x{r['decode_speedup']}")
    pairs = r.get("decode_stage_pairs")
    if pairs:
        lines.append(f"decode stage over one-process video+audio (Ray worker), {len(pairs['ratio_with_audio'])} paired "
                     f"runs: {' '.join(str(x) for x in pairs['ratio_with_audio'])}; median "
                     f"{pairs['median_with_audio']:.3f}")
    eff = r["decode_cpu_efficiency"]
    lines.append(f"decode CPU ms/clip, steady: stage {eff['stage_cpu_ms']} (decode child {eff['child_cpu_ms']}); "
                 f"one-process video over child {eff['video_over_child']}, over stage {eff['video_over_stage']}, "
                 f"video+audio over stage {eff['video_audio_over_stage']} (the rate ratios on equal CPU: a spare core "
                 f"for the actor / every core busy); keyframe speedup in child CPU x{r['decode_speedup_cpu']}")
    lim = r["limits"]
    if "min_rate" in lim:
        lines.append(f"limits: min(rate_i) {lim['min_rate']} ({lim['slowest_stage']}), shared 1/sum(1/rate_i) "
                     f"{lim['shared_limit']}, CPU cpus/sum(cpu_i) {lim.get('cpu_limit')} clips/s; full steady over "
                     f"them: {r.get('ratio_full_over_min_rate')} / {r.get('ratio_full_over_shared_limit')} / "
                     f"{r.get('ratio_full_over_cpu_limit')}")
    full = r["full_pipeline"]
    lines.append("full pipeline busy fraction: " + ", ".join(f"{k}={v['busy_fraction']}" for k, v in full["stages"].items()))
    gen = {k: v for k, v in full["stages"].items() if k in ("asr", "describe")}
    if gen:
        lines.append("full pipeline generation: " + ", ".join(
            f"{k} {v['tokens']} tokens, {v['tokens_per_busy_s']} tokens/s busy, {v['busy_ms_per_row']} busy ms/clip"
            for k, v in gen.items()))
    fr = full.get("first_row")
    if fr:
        lines.append(f"time to first row {fr['seconds']} s after Ray init ({fr.get('ray_init_s')} s): last actor ready "
                     f"{fr.get('last_actor_ready_s')} s ({fr.get('last_actor_stage')}: process start "
                     f"{fr.get('its_process_started_s')} s, imports {fr.get('its_imports_s')} s, init/model load "
                     f"{fr.get('its_init_s')} s), then {fr.get('after_all_ready_s')} s to the first batch out")
    if "sequential_baseline" in r:
        s = r["sequential_baseline"]
        lines.append(f"MERTools-style sequential baseline ({s['where']}): {s['clips_per_s']} clips/s ({s['seconds']} s, "
                     f"eager imports {s.get('import_s')} s, per model (with torch's import in the first) {s['per_branch_s']}); pipeline speedup x{r['speedup_vs_sequential']}")
    for ab, m in (r.get("decode_rss") or {}).items():
        if isinstance(m, dict) and m:
            lines.append(f"decode child RSS over {m['decodes']} decodes, no recycling, {ab} audio: {m['rss_mb_after_20']} "
                         f"→ {m['rss_mb_end']} MB ({m['slope_mb_per_1000_clips']} MB/1000 clips); child CPU "
                         f"{m['child_cpu_ms']} ms/clip, of which decode_clip {m['decode_cpu_ms']}, protocol "
                         f"{m['protocol_cpu_ms']}")
    lines.append(f"CPU pressure (PSI some avg60, %: time runnable tasks waited for a CPU): start "
                 f"{(r.get('cpu_pressure_start') or {}).get('some_avg60')}, end "
                 f"{(r.get('cpu_pressure_end') or {}).get('some_avg60')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench extract [--manifest M] [-n N] [--rss N [--out DIR]]``."""
    p = sub.add_parser("extract", parents=parents, help="where the extraction time goes (decode, face, encoders, "
                       "the streaming pipeline, a sequential baseline); --rss N: memory over a long stream")
    p.add_argument("--manifest", default=None, help="manifest of the clips (default: generated clips)")
    p.add_argument("-n", type=int, default=32, help="clips")
    p.add_argument("--rss", type=int, default=0, metavar="N",
                   help="driver and worker memory over N generated clips (small frames) instead")
    p.add_argument("--out", default=None, help="--rss: a local working directory (default a temp dir)")
    p.set_defaults(bench=run_command)


def run_command(cfg: MerConfig, args: argparse.Namespace) -> str | dict[str, Any] | None:
    """The table (printed as it is measured), or with ``--json`` only the JSON document."""
    if args.rss:
        result = bench_rss(cfg, args.rss, workdir=args.out)
        return result if args.json else format_rss(result)
    result = bench_extract(cfg, args.manifest, n_clips=args.n, ray_init_s=args.ray_init_s, verbose=not args.json)
    return result if args.json else None
