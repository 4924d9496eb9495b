"""The part store and the feature store's contract without Ray: atomic parts, dedupe, resume ids, schema and
config checks, stage chains."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mer.config import load_config
from mer.extract import schema
from mer.extract.columns import normalize_batch
from mer.runtime.stream import PipelineError, Stage, validate_chain
from mer.store import parts, storage


def _rows(cfg, ids: list[str]) -> pa.Table:
    fields = schema.feature_schema(cfg)
    data = {f.name: [None] * len(ids) for f in fields}
    data["clip_id"] = ids
    data["status"] = ["ok"] * len(ids)
    data["global_visual"] = [[float(i), 1.0] for i in range(len(ids))]
    data["n_face_frames"] = [0] * len(ids)
    return pa.table({f.name: pa.array(data[f.name], f.type) for f in fields})


def test_schema_follows_config() -> None:
    cfg = load_config()
    names = schema.feature_schema(cfg).names
    for b in ("global_visual", "face", "audio", "text"):
        assert b in names and f"{b}_status" in names and f"{b}_seq" not in names
    assert schema.feature_schema(cfg).field("text").type == pa.list_(pa.float32())
    both = load_config(overrides=["enrich.text_source=both", "extract.encoders.face.keep_sequence=true"])
    s = schema.feature_schema(both)
    assert "text_enriched" in s.names and s.field("face_seq").type == pa.list_(pa.list_(pa.float32()))
    # resources do not change the feature hash; frame count does
    assert schema.config_hash(cfg) == schema.config_hash(load_config(overrides=["extract.decode.resources.batch_size=2"]))
    assert schema.config_hash(cfg) != schema.config_hash(load_config(overrides=["extract.decode.num_frames=8"]))


def test_part_writer_exactly_once(tmp_path) -> None:
    cfg = load_config()
    uri = str(tmp_path / "store")
    w = parts.PartWriter(uri, schema.feature_schema(cfg), rows_per_part=3, already={"c0"})
    w.add(_rows(cfg, ["c0", "c1", "c2"]))  # c0 is already stored
    w.add(_rows(cfg, ["c3", "c1", "c4"]))  # c1 repeated (e.g. a retried task)
    assert len(w.parts) == 1 and w.buffered == 1 and w.duplicates_dropped == 2
    w.flush()
    assert [storage.read_table(p).num_rows for p in w.parts] == [3, 1]
    assert parts.stored_ids(uri) == {"c1", "c2", "c3", "c4"}
    t = parts.read_parts(uri)
    assert sorted(t["clip_id"].to_pylist()) == ["c1", "c2", "c3", "c4"]
    assert t.schema.equals(schema.feature_schema(cfg))
    # no temp files are left next to the parts
    assert all(p.endswith(".parquet") for p in storage.list_files(uri))


def test_read_dedupes_and_check_reports(tmp_path) -> None:
    cfg = load_config()
    uri = str(tmp_path / "store")
    schema.ensure_meta(cfg, uri)
    for run in ("a", "b"):  # two runs that both committed c1
        w = parts.PartWriter(uri, schema.feature_schema(cfg), rows_per_part=10)
        w.run = run
        w.add(_rows(cfg, ["c1", f"c_{run}"]))
        w.flush()
    assert parts.read_parts(uri).num_rows == 3
    report = schema.check_store(uri, cfg, manifest_ids=["c1", "c_a", "c_b", "c_missing"])
    assert report["duplicates"] == ["c1"] and report["missing"] == ["c_missing"] and not report["ok"]
    assert report["problems"] == []


def test_meta_refuses_other_config(tmp_path) -> None:
    cfg = load_config()
    uri = str(tmp_path / "store")
    meta = schema.ensure_meta(cfg, uri)
    on_disk = json.loads((tmp_path / "store" / "_meta.json").read_text())
    assert on_disk["config_hash"] == meta["config_hash"] and on_disk["schema_version"] == schema.SCHEMA_VERSION
    assert on_disk["model_ids"]["global_visual"] == cfg.models.global_visual.model_id
    w = parts.PartWriter(uri, schema.feature_schema(cfg), rows_per_part=10)
    w.add(_rows(cfg, ["c1"]))
    w.flush()
    other = load_config(overrides=["extract.decode.frame_size=112"])
    with pytest.raises(ValueError, match="config hash"):
        schema.ensure_meta(other, uri)
    schema.ensure_meta(other, uri, allow_config_change=True)


def test_status_counts() -> None:
    t = pa.table({"status": ["ok", "partial", "ok"], "face_status": ["ok", "no_face", None]})
    assert schema.status_counts(t) == {"status": {"ok": 2, "partial": 1},
                                      "face_status": {"ok": 1, "no_face": 1, "null": 1}}


def test_chain_validation() -> None:
    a = Stage("a", fn=None, inputs=("clip_id",), outputs=("frames",))
    b = Stage("b", fn=None, inputs=("frames", "face_crops"), outputs=("face",))
    with pytest.raises(PipelineError, match="'b' needs columns \\['face_crops'\\]"):
        validate_chain([a, b], ["clip_id"])
    c = Stage("c", fn=None, inputs=("frames", "text_enriched"), optional_inputs=("text_enriched",), outputs=("x",))
    assert validate_chain([a, c], ["clip_id"]) == ["clip_id", "frames", "x"]


def test_normalize_batch_keeps_block_types_consistent() -> None:
    import numpy as np

    vec = np.empty(2, dtype=object)
    vec[0], vec[1] = np.ones(3, np.float32), None
    err = np.array([None, "boom"], dtype=object)
    frames = np.array([None, None], dtype=object)
    out = normalize_batch({"face": vec, "face_error": err, "frames": frames})
    assert out["face"][1].shape == (0,) and out["face"][1].dtype == np.float32
    assert list(out["face_error"]) == ["", "boom"]
    assert out["frames"][0].shape == (0, 0, 0, 0) and out["frames"][0].dtype == np.uint8


def test_colocated_encoders_are_one_stage_after_the_extra_stages() -> None:
    from mer.extract.pipeline import build_stages

    cfg = load_config(profile="tiny", overrides=["extract.encoders.colocated.num_cpus=0.5",
                                                 "extract.encoders.colocated.batch_size=8"])
    extra = Stage("enrich_actor", fn=None, inputs=("clip_id",), outputs=("text_enriched",))
    stages = build_stages(cfg, extra_stages=[extra])
    assert [s.name for s in stages] == ["decode", "face_detect", "enrich_actor", "encoders"]
    group = stages[-1]
    assert group.resources.num_cpus == 0.5 and group.constructor_args[1] == ("global_visual", "face", "audio", "text")
    # columns a branch rewrites in place (the waveform `audio`, the transcript `text`) stay inputs
    assert {"frames", "face_crops", "audio", "text"} <= set(group.inputs)
    cols = validate_chain(stages, ["clip_id", "video_uri", "audio_uri", "text"])
    assert {"global_visual", "face", "audio_status", "text_status", "text_enriched"} <= set(cols)


def test_stage_times_fold_the_timing_columns() -> None:
    import math

    from mer.extract.timing import StageTimes, drop_timing, is_timing

    t0 = 1000.0
    st = StageTimes(t0)

    def batch(stage: str, end: float, cpu: float, start: tuple[float, float, float] | None) -> pa.Table:
        p, i, r = start or (math.nan,) * 3
        return pa.table({"clip_id": ["a", "b"], f"_t_{stage}": [0.5, 0.5], f"_tc_{stage}": [cpu, cpu],
                         f"_th_{stage}": [cpu / 2, cpu / 2],
                         f"_tb_{stage}": [end - 1.0] * 2, f"_te_{stage}": [end] * 2,
                         f"_tp_{stage}": [p] * 2, f"_ti_{stage}": [i] * 2, f"_tr_{stage}": [r] * 2})

    # decode: actor process at +1 s, __init__ from +3 s to +4 s; 3 batches of 2 rows ending at +5, +6, +7 s
    for k, end in enumerate((1005.0, 1006.0, 1007.0)):
        st.add(batch("decode", end, 2.0 if k == 0 else 0.25, (1001.0, 1003.0, 1004.0) if k == 0 else None))
    st.first_row_at, st.last_row_at = 1008.0, 1010.0
    s = st.summary({"decode": 1})
    d = s["stages"]["decode"]
    assert d["steady_rows_per_s"] == 2.0 and d["steady_cpu_ms_per_row"] == 250.0  # first batch excluded
    assert d["steady_helper_cpu_ms_per_row"] == 125.0
    assert d["cpu_ms_per_row"] == round(1000 * (2 * 2.0 + 4 * 0.25) / 6, 2)  # start-up included
    assert d["busy_fraction"] == round(3.0 / 10.0, 4) and d["first_batch_at_s"] == 4.0
    assert d["actors"] == [{"process_started_s": 1.0, "init_s": 1.0, "ready_s": 4.0}]
    fr = s["first_row"]
    assert (fr["seconds"], fr["last_actor_ready_s"], fr["its_imports_s"], fr["after_all_ready_s"]) == (8.0, 4.0, 2.0, 4.0)
    table = batch("decode", 1.0, 0.1, None)
    assert is_timing("_tc_decode") and not is_timing("clip_id") and drop_timing(table).column_names == ["clip_id"]
