"""The extraction pipeline on real local Ray (2 CPUs) with tiny models: statuses of broken inputs, the
store contract, resume, crash + resume exactly-once, S3 in/out (moto), and an encoder actor killed mid-run.

The all-branch extraction of the clip set + the generated dataset's subset is the session's extracted store
(conftest); the other tests extract what they need themselves."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mer.config import with_overrides
from mer.extract import schema
from mer.extract.pipeline import extract_features
from mer.store import parts, storage

from waiting import wait_for

# make check leaves the module out: every test extracts (the session's extracted store among them)
pytestmark = pytest.mark.slow

BROKEN = {  # clip_id -> expected (decode_status, global_visual, face, audio, text) statuses
    "zero_byte": ("decode_error", "decode_error", "decode_error", "decode_error", "ok"),
    "truncated": ("decode_error", "decode_error", "decode_error", "decode_error", "ok"),
    "missing": ("missing_file", "missing_file", "missing_file", "missing_file", "ok"),
    "no_audio": ("ok", "ok", "ok", "no_audio", "ok"),
    "no_face": ("ok", "ok", "no_face", "ok", "ok"),
    "empty_text": ("ok", "ok", "ok", "ok", "empty_text"),
}


class SimulatedKill(Exception):
    """Stands in for the driver dying between two part commits."""


def _cfg(tiny_config, **extract):
    return with_overrides(tiny_config, [f"extract.{k}={v}" for k, v in extract.items()])


def _only(cfg, branches: list[str]):
    return with_overrides(cfg, [f"extract.encoders.{b}.enabled={b in branches}"
                                for b in ("global_visual", "face", "audio", "text")])


@pytest.fixture
def local_run(extracted_store):
    """The session's extraction of the combined manifest (conftest), every branch on."""
    return extracted_store


def test_all_branches_and_broken_inputs(local_run) -> None:
    cfg, out, summary = local_run
    assert summary["processed"] == 26 and summary["parts_written"] == 6  # 5 x 5 + 1
    t = parts.read_parts(out)
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
    cfg, out, _ = local_run
    col = with_overrides(cfg, ["extract.encoders.colocated={batch_size: 8, num_cpus: 0.5}"])
    assert col.extract.encoders.colocated.num_cpus == 0.5
    summary = extract_features(col, clip_manifest, str(tmp_path / "features"))
    assert summary["processed"] == 16
    # timings stay per branch: each model's load and busy time inside the one actor
    assert set(summary["stage_busy_fraction"]) == {"decode", "face_detect", "global_visual", "face", "audio", "text"}
    assert summary["first_row_s"] > 0
    sep = {r["clip_id"]: r for r in parts.read_parts(out).to_pylist()}
    for r in parts.read_parts(str(tmp_path / "features")).to_pylist():
        ref = sep[r["clip_id"]]
        for b in ("global_visual", "face", "audio", "text"):
            assert r[f"{b}_status"] == ref[f"{b}_status"], (r["clip_id"], b)
            assert (r[b] is None) == (ref[b] is None)
            if r[b] is not None:
                assert np.allclose(r[b], ref[b], atol=1e-4), (r["clip_id"], b)


def test_synth_dataset_broken_kinds(local_run, synth_subset) -> None:
    """The generated MER2025-layout dataset: every broken kind gets its status; its faces are detected."""
    _, out, _ = local_run
    rows = {r["clip_id"]: r for r in parts.read_parts(out).to_pylist()}
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
    report = schema.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"], report
    meta = schema.read_meta(out)
    t = parts.read_parts(out)
    assert set(t["config_hash"].to_pylist()) == {meta["config_hash"]} == {schema.config_hash(cfg)}
    assert '"face": "tiny:face"' in t["model_ids"][0].as_py()
    # the heavy arrays never reach the store
    assert not {"frames", "audio_status_x", "face_crops", "face_mask"} & set(t.column_names)


def test_resume_skips_and_redoes_deleted_part(local_run, combined_manifest, tmp_path) -> None:
    cfg, session_store, _ = local_run
    out = str(tmp_path / "features")
    shutil.copytree(session_store, out)  # the session's store stays as it is
    clip_manifest = combined_manifest
    again = extract_features(cfg, clip_manifest, out)
    assert again["processed"] == 0 and again["parts_written"] == 0 and again["already_stored"] == 26
    files = parts.part_files(out)
    victim = files[1]
    lost = set(storage.read_table(victim)["clip_id"].to_pylist())
    os.remove(victim)
    redo = extract_features(cfg, clip_manifest, out)
    assert redo["processed"] == len(lost) == 5 and redo["already_stored"] == 21
    new_part = (set(parts.part_files(out)) - set(files)).pop()
    assert set(storage.read_table(new_part)["clip_id"].to_pylist()) == lost
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    assert schema.check_store(out, cfg, manifest_ids=ids)["ok"]


def test_crash_mid_run_then_resume_exactly_once(ray_local, tiny_config, clip_manifest, tmp_path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _only(_cfg(tiny_config, rows_per_part=3), ["text"])
    out = str(tmp_path / "features")
    real_commit = parts.PartWriter._commit

    def crash_after_first(self, n):
        if self.parts:
            raise SimulatedKill("driver killed after its first part")
        real_commit(self, n)

    monkeypatch.setattr(parts.PartWriter, "_commit", crash_after_first)
    with pytest.raises(SimulatedKill):
        extract_features(cfg, clip_manifest, out)
    assert len(parts.stored_ids(out)) == 3  # only the committed part survived
    monkeypatch.setattr(parts.PartWriter, "_commit", real_commit)
    done = extract_features(cfg, clip_manifest, out)
    assert done["processed"] == 13 and done["already_stored"] == 3
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    report = schema.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"] and report["rows"] == 16, report
    t = parts.read_parts(out)
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
    t = parts.read_parts(out)
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


def _our_actor_pids(class_hint: str, states: tuple[str, ...] = ("ALIVE",)) -> list[int]:
    """Pids of this Ray cluster's actors in ``states`` whose process title names ``class_hint`` (never a
    process of another Ray instance on the machine)."""
    from ray._private import state

    pids = []
    for a in state.actors().values():
        if a.get("State") not in states or not a.get("Pid"):
            continue
        try:
            title = Path(f"/proc/{a['Pid']}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if class_hint in title:
            pids.append(int(a["Pid"]))
    return pids


def test_encoder_actor_killed_mid_run_is_restarted(ray_local, tiny_config, clip_manifest, tmp_path) -> None:
    """An encoder actor dies while the stream still has clips for it: the job finishes by itself with
    every clip exactly once. The test holds the stream still while it kills: the decode actor is paused
    (SIGSTOP) as soon as it exists, so the audio pool cannot drain its input and be retired on purpose
    (a kill then would hit an actor meant to die, and prove nothing), until a new audio encoder is up."""
    cfg = _only(_cfg(tiny_config, rows_per_part=4), ["audio"])
    out = str(tmp_path / "features")
    events: dict[str, object] = {}
    paused: list[int] = []

    def resume() -> None:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def drill() -> None:
        try:
            paused.extend(wait_for("the decode actor", lambda: _our_actor_pids(
                "ClipDecoder", ("PENDING_CREATION", "ALIVE")), 120))
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
            victim = wait_for("the audio encoder actor", lambda: _our_actor_pids("AudioEncoder"), 120)[0]
            os.kill(victim, signal.SIGKILL)
            events["killed"] = victim
            events["replacement"] = wait_for("a new audio encoder actor", lambda: [
                p for p in _our_actor_pids("AudioEncoder") if p != victim], 120)[0]
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            events["error"] = e
        finally:
            resume()

    th = threading.Thread(target=drill, daemon=True)
    th.start()
    try:
        s = extract_features(cfg, clip_manifest, out)
    finally:
        th.join(timeout=150)
        resume()
    assert "error" not in events, events
    assert events["killed"] != events["replacement"], events
    ids = pq.read_table(clip_manifest)["clip_id"].to_pylist()
    report = schema.check_store(out, cfg, manifest_ids=ids)
    assert report["ok"] and report["rows"] == 16, report  # every clip, none twice
    assert s["processed"] == 16
    t = parts.read_parts(out)
    audio_ok = {c for c, st in zip(t["clip_id"].to_pylist(), t["audio_status"].to_pylist()) if st == "ok"}
    assert audio_ok == {f"ok_{i:03d}" for i in range(10)} | {"no_face", "empty_text"}
