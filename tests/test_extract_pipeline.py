"""The extraction pipeline on real local Ray (2 CPUs) with tiny models: statuses of broken inputs, the
store contract, resume, crash + resume exactly-once, S3 in/out (moto), and an encoder actor killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mer import storage
from mer.extract import store
from mer.extract.clips import make_clip_set
from mer.extract.pipeline import extract_features

BROKEN = {  # clip_id -> expected (decode_status, global_visual, face, audio, text) statuses
    "zero_byte": ("decode_error", "decode_error", "decode_error", "decode_error", "ok"),
    "truncated": ("decode_error", "decode_error", "decode_error", "decode_error", "ok"),
    "missing": ("missing_file", "missing_file", "missing_file", "missing_file", "ok"),
    "no_audio": ("ok", "ok", "ok", "no_audio", "ok"),
    "no_face": ("ok", "ok", "no_face", "ok", "ok"),
    "empty_text": ("ok", "ok", "ok", "ok", "empty_text"),
}


def start_ray_with_retry(attempts: int = 4) -> None:
    """Start the session's local Ray (the ``ray_local`` settings) before ``ray_local`` does, retrying:
    on a loaded machine the raylet can die waiting 15 s for its agent (ray-project/ray#65983)."""
    import ray

    for i in range(attempts):
        if ray.is_initialized():
            return
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                               if k.startswith(("AWS_", "HF_", "TRANSFORMERS_", "VLLM_", "XDG_"))}})
        except Exception:  # noqa: BLE001 - retried; the last failure propagates
            ray.shutdown()
            if i == attempts - 1:
                raise
            time.sleep(5)


@pytest.fixture(scope="module", autouse=True)
def _ray_started(s3_server):
    # s3_server first: Ray workers then inherit the AWS_* variables of the moto endpoint.
    start_ray_with_retry()


class SimulatedKill(Exception):
    """Stands in for the driver dying between two part commits."""


@pytest.fixture(scope="module")
def clip_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("extract_clips")
    table = make_clip_set(d / "clips", n_ok=10)  # 10 good + 6 broken = 16 clips
    pq.write_table(table, d / "manifest.parquet")
    return str(d / "manifest.parquet")


@pytest.fixture(scope="module")
def synth_subset(synth_root, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The data helper's generated MER2025-layout dataset: its 6 broken clips + 4 good ones."""
    import csv

    import pyarrow as pa

    with open(synth_root / "synth_truth.csv", encoding="utf-8") as f:
        truth = {r["name"]: r["broken"] for r in csv.DictReader(f)}
    manifest = pq.read_table(synth_root / "manifest.parquet")
    pick = [c for c, k in truth.items() if k] + [c for c, k in truth.items() if not k][:4]
    sub = manifest.filter(pa.array([c in set(pick) for c in manifest["clip_id"].to_pylist()]))
    out = tmp_path_factory.mktemp("synth_subset") / "manifest.parquet"
    pq.write_table(sub, out)
    return str(out), {c: truth[c] for c in pick}


@pytest.fixture(scope="module")
def combined_manifest(clip_manifest, synth_subset, tmp_path_factory: pytest.TempPathFactory) -> str:
    import pyarrow as pa

    own = pq.read_table(clip_manifest)
    synth = pq.read_table(synth_subset[0]).select(own.column_names).cast(own.schema)
    out = tmp_path_factory.mktemp("combined") / "manifest.parquet"
    pq.write_table(pa.concat_tables([own, synth]), out)
    return str(out)


def _cfg(tiny_config, **extract):
    ex = tiny_config.extract.model_copy(update=extract)
    return tiny_config.model_copy(update={"extract": ex})


def _only(cfg, branches: list[str]):
    enc = cfg.extract.encoders.model_copy(update={
        b: getattr(cfg.extract.encoders, b).model_copy(update={"enabled": b in branches})
        for b in ("global_visual", "face", "audio", "text")})
    return cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"encoders": enc})})


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_config, combined_manifest, tmp_path_factory):
    cfg = _cfg(tiny_config, rows_per_part=5)
    out = str(tmp_path_factory.mktemp("store") / "features")
    summary = extract_features(cfg, combined_manifest, out)
    return cfg, out, summary


def test_all_branches_and_broken_inputs(local_run) -> None:
    cfg, out, summary = local_run
    assert summary["processed"] == 26 and summary["parts_written"] == 6  # 5 x 5 + 1
    t = store.read_features(out)
    rows = {r["clip_id"]: r for r in t.to_pylist()}
    assert len(rows) == 26
    for cid, (dec, gv, face, audio, text) in BROKEN.items():
        r = rows[cid]
        got = (r["decode_status"], r["global_visual_status"], r["face_status"], r["audio_status"], r["text_status"])
        assert got == (dec, gv, face, audio, text), cid
        for b, st in zip(("global_visual", "face", "audio", "text"), got[1:]):
            assert (r[b] is not None) == (st == "ok"), (cid, b)
        assert r["status"] == "partial" and r["error"], cid
    assert "zero-byte" in rows["zero_byte"]["error"]
    ok = [r for cid, r in rows.items() if cid.startswith("ok_")]
    assert all(r["status"] == "ok" and r["error"] is None for r in ok)
    dims = {b: {len(r[b]) for r in ok} for b in ("global_visual", "face", "audio", "text")}
    assert all(len(d) == 1 and d.pop() > 0 for d in dims.values()), dims
    # one decode fed every branch: the face vectors come from the detected crops of the same frames
    assert all(r["n_face_frames"] >= 1 for r in ok) and rows["no_face"]["n_face_frames"] == 0
    # distinct clips give distinct visual features (real pixels reached the encoder)
    gv = np.array([r["global_visual"] for r in ok])
    assert np.linalg.matrix_rank(gv - gv.mean(0)) >= 2
    # labels/splits/transcripts carried from the manifest
    assert rows["ok_003"]["split"] == "train" and rows["ok_003"]["label"] is not None
    assert rows["ok_003"]["transcript"].startswith("第3句")
    assert summary["status_counts"]["status"] == {"ok": 14, "partial": 12}
    assert summary["status_counts"]["face_status"]["no_face"] == 2
    assert set(summary["stage_busy_s"]) >= {"decode", "face_detect", "global_visual", "face", "audio", "text"}
    assert 0 < summary["stage_busy_fraction"]["decode"] <= 1 and summary["first_row_s"] > 0


def test_colocated_encoders_give_the_same_features(local_run, clip_manifest, tmp_path) -> None:
    """extract.encoders.colocated: every encoder in one actor pool, same rows and vectors as separate pools."""
    from mer.config import StageResources

    cfg, out, _ = local_run
    enc = cfg.extract.encoders.model_copy(update={"colocated": StageResources(batch_size=8, num_cpus=0.5)})
    col = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"encoders": enc})})
    summary = extract_features(col, clip_manifest, str(tmp_path / "features"))
    assert summary["processed"] == 16
    # timings stay per branch: each model's load and busy time inside the one actor
    assert set(summary["stage_busy_fraction"]) == {"decode", "face_detect", "global_visual", "face", "audio", "text"}
    assert summary["first_row_s"] > 0
    sep = {r["clip_id"]: r for r in store.read_features(out).to_pylist()}
    for r in store.read_features(str(tmp_path / "features")).to_pylist():
        ref = sep[r["clip_id"]]
        for b in ("global_visual", "face", "audio", "text"):
            assert r[f"{b}_status"] == ref[f"{b}_status"], (r["clip_id"], b)
            assert (r[b] is None) == (ref[b] is None)
            if r[b] is not None:
                assert np.allclose(r[b], ref[b], atol=1e-4), (r["clip_id"], b)


def test_synth_dataset_broken_kinds(local_run, synth_subset) -> None:
    """The generated MER2025-layout dataset: every broken kind gets its status; its faces are detected."""
    _, out, _ = local_run
    rows = {r["clip_id"]: r for r in store.read_features(out).to_pylist()}
    for cid, kind in synth_subset[1].items():
        r = rows[cid]
        got = (r["decode_status"], r["face_status"], r["audio_status"], r["text_status"])
        if kind:
            assert got == SYNTH_EXPECTED[kind], (kind, got, r["error"])
        else:
            assert r["status"] == "ok", r["error"]
            assert r["n_face_frames"] >= 1  # the synthetic faces are found by the Haar cascade


def test_store_schema_and_meta(local_run, combined_manifest) -> None:
    cfg, out, _ = local_run
    ids = pq.read_table(combined_manifest)["clip_id"].to_pylist()
    report = store.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"], report
    meta = store.read_meta(out)
    t = store.read_features(out)
    assert set(t["config_hash"].to_pylist()) == {meta["config_hash"]} == {store.config_hash(cfg)}
    assert '"face": "tiny:face"' in t["model_ids"][0].as_py()
    # the heavy arrays never reach the store
    assert not {"frames", "audio_status_x", "face_crops", "face_mask"} & set(t.column_names)


def test_resume_skips_and_redoes_deleted_part(local_run, combined_manifest) -> None:
    cfg, out, _ = local_run
    clip_manifest = combined_manifest
    again = extract_features(cfg, clip_manifest, out)
    assert again["processed"] == 0 and again["parts_written"] == 0 and again["already_stored"] == 26
    parts = store.part_files(out)
    victim = parts[1]
    lost = set(storage.read_table(victim)["clip_id"].to_pylist())
    os.remove(victim)
    redo = extract_features(cfg, clip_manifest, out)
    assert redo["processed"] == len(lost) == 5 and redo["already_stored"] == 21
    new_part = (set(store.part_files(out)) - set(parts)).pop()
    assert set(storage.read_table(new_part)["clip_id"].to_pylist()) == lost
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    assert store.check_store(out, cfg, manifest_ids=ids)["ok"]


def test_crash_mid_run_then_resume_exactly_once(ray_local, tiny_config, clip_manifest, tmp_path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _only(_cfg(tiny_config, rows_per_part=3), ["text"])
    out = str(tmp_path / "features")
    real_commit = store.PartWriter._commit

    def crash_after_first(self, n):
        if self.parts:
            raise SimulatedKill("driver killed after its first part")
        real_commit(self, n)

    monkeypatch.setattr(store.PartWriter, "_commit", crash_after_first)
    with pytest.raises(SimulatedKill):
        extract_features(cfg, clip_manifest, out)
    assert len(store.stored_ids(out)) == 3  # only the committed part survived
    monkeypatch.setattr(store.PartWriter, "_commit", real_commit)
    done = extract_features(cfg, clip_manifest, out)
    assert done["processed"] == 13 and done["already_stored"] == 3
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    report = store.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"] and report["rows"] == 16, report
    t = store.read_features(out)
    assert set(t["face_status"].to_pylist()) == {"disabled"} and t["face"].null_count == 16


def test_s3_in_and_out(s3_server, ray_local, tiny_config, clip_manifest) -> None:
    cfg = _only(_cfg(tiny_config, rows_per_part=2), ["audio"])
    src = pq.read_table(clip_manifest).to_pylist()
    keep = [r for r in src if r["clip_id"] in ("ok_000", "ok_001", "no_audio", "missing", "zero_byte")]
    for r in keep:  # videos and manifest on S3 too
        key = f"s3://mer-test/clips/{Path(r['video_uri']).name}"
        if os.path.exists(r["video_uri"]):
            storage.write_bytes(key, Path(r["video_uri"]).read_bytes())
        r["video_uri"] = key
    import pyarrow as pa

    storage.write_table("s3://mer-test/manifest.parquet", pa.Table.from_pylist(keep))
    out = "s3://mer-test/features"
    s = extract_features(cfg, "s3://mer-test/manifest.parquet", out)
    assert s["processed"] == 5 and s["parts_written"] == 3
    t = store.read_features(out)
    st = dict(zip(t["clip_id"].to_pylist(), t["decode_status"].to_pylist()))
    assert st == {"ok_000": "ok", "ok_001": "ok", "no_audio": "ok", "missing": "missing_file",
                  "zero_byte": "decode_error"}
    au = dict(zip(t["clip_id"].to_pylist(), t["audio_status"].to_pylist()))
    assert au["no_audio"] == "no_audio" and au["ok_000"] == "ok"
    assert storage.exists(f"{out}/_meta.json")
    assert extract_features(cfg, "s3://mer-test/manifest.parquet", out)["processed"] == 0


SYNTH_EXPECTED = {  # synth broken kind -> (decode, face, audio, text) statuses
    "zero_byte": ("decode_error", "decode_error", "decode_error", "ok"),
    "truncated": ("decode_error", "decode_error", "decode_error", "ok"),
    "missing_video": ("missing_file", "missing_file", "missing_file", "ok"),
    "no_audio": ("ok", "ok", "no_audio", "ok"),
    "no_face": ("ok", "no_face", "ok", "ok"),
    "empty_text": ("ok", "ok", "ok", "empty_text"),
}


def _our_actor_pids(class_hint: str) -> list[int]:
    """Pids of ALIVE actors of this Ray cluster whose process title names ``class_hint``."""
    from ray._private import state

    pids = []
    for a in state.actors().values():
        if a.get("State") != "ALIVE" or not a.get("Pid"):
            continue
        try:
            title = Path(f"/proc/{a['Pid']}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if class_hint in title:
            pids.append(int(a["Pid"]))
    return pids


def test_encoder_actor_killed_mid_run_is_restarted(ray_local, tiny_config, clip_manifest, tmp_path) -> None:
    from ray._private import state

    cfg = _only(_cfg(tiny_config, rows_per_part=4), ["audio"])
    out = str(tmp_path / "features")
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        # Kill the audio encoder's actor process as soon as it is up (its model loaded): the tiny encoder
        # drains its input in well under a second, after which Ray Data retires the pool on purpose and
        # a later kill would hit an actor that is meant to die (no restart to observe).
        while not stop.is_set() and not killed:
            pids = _our_actor_pids("AudioEncoder")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        s = extract_features(cfg, clip_manifest, out)
    finally:
        stop.set()
        th.join(timeout=10)
    assert killed, "the audio encoder actor was never seen alive"
    restarted = [a for a in state.actors().values() if a.get("NumRestarts", 0) >= 1]
    assert restarted, "Ray did not restart the killed actor"
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    report = store.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"] and report["rows"] == 16, report
    assert s["processed"] == 16
    t = store.read_features(out)
    audio_ok = {c for c, st in zip(t["clip_id"].to_pylist(), t["audio_status"].to_pylist()) if st == "ok"}
    assert audio_ok == {f"ok_{i:03d}" for i in range(10)} | {"no_face", "empty_text"}


def test_actor_pools_that_cannot_all_start_are_named() -> None:
    from mer.config import load_config
    from mer.extract.pipeline import actor_pool_shortfall, build_stages

    cfg = load_config(profile="tiny", overrides=[f"extract.encoders.{b}.resources.num_gpus=0"
                                                 for b in ("global_visual", "face", "audio", "text")])
    stages = build_stages(cfg)
    short = actor_pool_shortfall(stages, {"CPU": 2.0})
    assert len(short) == 1 and "CPU" in short[0] and "has 2" in short[0]
    assert actor_pool_shortfall(stages, {"CPU": 64.0}) == []
    gpu = build_stages(load_config(profile="tiny"))
    assert any("GPU" in m for m in actor_pool_shortfall(gpu, {"CPU": 64.0}))
