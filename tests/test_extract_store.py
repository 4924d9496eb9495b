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


def test_an_open_store_is_read_lazily_and_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PartStore reads nothing when opened, then lists its parts, reads its meta, its schema and each part's keys
    once, however many readers share it (a training run's reads of its store among them); a URI is listed anew
    on every call, and a store opened again sees what was committed since."""
    import pickle
    from collections import Counter

    import pyarrow.parquet as pq

    from mer.runs.provenance import store_record
    from mer.train.features import modality_dims
    from mer.train.run import label_rows, resolve_modalities

    cfg = load_config()
    uri = str(tmp_path / "store")
    schema.ensure_meta(cfg, uri)
    rows = _rows(cfg, ["c1", "c2", "c3"])
    rows = rows.set_column(rows.column_names.index("split"), "split", pa.array(["train"] * 3, pa.string()))
    rows = rows.set_column(rows.column_names.index("label"), "label", pa.array(["happy", "sad", "happy"]))
    parts.write_part(uri, rows.slice(0, 2), "part-0.parquet")
    parts.write_part(uri, rows.slice(1, 2), "part-1.parquet")  # c2 again: a retried commit, read once

    calls: Counter = Counter()

    def counted(module, name: str) -> None:
        real = getattr(module, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    counted(storage, "list_files")
    counted(storage, "read_json")
    counted(storage, "read_table")
    counted(pq, "read_schema")

    store = parts.PartStore(uri)
    assert parts.PartStore.of(store) is store and not calls  # opening reads nothing
    assert [p.rsplit("/", 1)[-1] for p in store.parts] == ["part-0.parquet", "part-1.parquet"]
    assert store.columns == schema.feature_schema(cfg).names
    assert store.meta["config_hash"] == schema.config_hash(cfg)
    assert store.ids() == {"c1", "c2", "c3"}
    assert store.read(columns=["label"]).column("clip_id").to_pylist() == ["c1", "c2", "c3"]
    assert resolve_modalities(cfg, store, ["global_visual"]) == ["global_visual"]
    assert modality_dims(store, ["global_visual"]) == {"global_visual": 2}
    assert label_rows(store, None)[0].num_rows == 3
    assert store_record(store)["config_hash"] == store.meta["config_hash"] and store_record(store)["uri"] == uri
    assert schema.read_meta(store) is store.meta
    assert calls["list_files"] == 1 and calls["read_json"] == 1
    assert calls["read_schema"] == 2  # each part's footer once (a part may lack a column the first one has)
    keys_read = calls["read_table"]
    assert store.ids() == {"c1", "c2", "c3"} and calls["read_table"] == keys_read  # keys came with the rows

    clone = pickle.loads(pickle.dumps(store))  # shipped with its reads (a Ray task, a thread pool)
    assert clone.ids() == store.ids() and clone.meta == store.meta and calls["list_files"] == 1

    # A snapshot: a part committed after the listing is in a store opened again, and in every call given a URI.
    parts.write_part(uri, _rows(cfg, ["c4"]), "part-2.parquet")
    assert "c4" not in store.ids() and "c4" in parts.PartStore(uri).ids()
    assert "c4" in parts.stored_ids(uri) and len(parts.part_files(uri)) == 3
    assert calls["list_files"] == 4
    # What ensure_meta writes becomes the open store's meta.
    fresh = parts.PartStore(str(tmp_path / "new"))
    assert fresh.meta is None and fresh.parts == [] and fresh.ids() == set()
    assert schema.ensure_meta(cfg, fresh) == fresh.meta
    with pytest.raises(FileNotFoundError, match="no Parquet parts"):
        fresh.columns


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
