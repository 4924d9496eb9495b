"""Manifest read/write/validation and the MER2025/2026 release importer (local and through S3)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.data.manifest import MANIFEST_COLUMNS, ManifestError, manifest_from_rows, read_manifest, write_manifest
from mer.data.mer2025 import import_mer2025, normalise_label
from mer.store import storage

ROWS = [
    {"clip_id": "00012", "video_uri": "/v/00012.mp4", "text": "我很高兴，今天。", "label": "happy", "split": "train"},
    {"clip_id": "sample_2", "video_uri": "/v/2.mp4", "audio_uri": "/a/2.wav", "text": None, "label": None,
     "split": "unlabeled"},
    {"clip_id": "sample_3", "video_uri": "s3://b/v/3.mp4", "text": "天哪", "label": "surprise", "split": "test"},
]


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- manifest -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_roundtrip_keeps_rows_and_string_ids(tmp_path: Path, suffix: str) -> None:
    uri = str(tmp_path / f"m{suffix}")
    written = write_manifest(manifest_from_rows(ROWS), uri)
    back = read_manifest(uri)
    assert back.column_names == list(MANIFEST_COLUMNS)
    assert all(pa.types.is_string(f.type) for f in back.schema)
    assert back.to_pylist() == written.to_pylist()
    assert back.column("clip_id").to_pylist() == ["00012", "sample_2", "sample_3"]  # not the integer 12
    assert back.column("audio_uri").to_pylist() == [None, "/a/2.wav", None]


def test_missing_optional_columns_and_split_are_derived(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.csv")
    _csv(tmp_path / "m.csv", ["clip_id", "video_uri", "label", "caption"],
         [["a", "/v/a.mp4", "sad", "a man cries"], ["b", "/v/b.mp4", "", ""]])
    t = read_manifest(uri)
    assert t.column_names == [*MANIFEST_COLUMNS, "caption"]  # extra columns kept, after the standard ones
    assert t.column("split").to_pylist() == ["train", "unlabeled"]
    assert t.column("text").to_pylist() == [None, None]


@pytest.mark.parametrize("bad, match", [
    ({"clip_id": "sample_3", "label": "Worried"}, r"clip 'sample_3' has unknown label 'Worried'"),
    ({"clip_id": "sample_2"}, r"duplicate clip_id 'sample_2'"),
    ({"clip_id": "sample_3", "split": "dev"}, r"clip 'sample_3' has unknown split 'dev'"),
    ({"clip_id": "sample_3", "label": None}, r"clip 'sample_3' is in split 'test' but has no label"),
    ({"clip_id": "sample_3", "video_uri": ""}, r"clip 'sample_3' has no video_uri"),
    ({"clip_id": ""}, r"row 2 has an empty clip_id"),
])
def test_validation_errors_name_the_row(tmp_path: Path, bad: dict, match: str) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2].update(bad)
    table = pa.Table.from_pylist(rows)
    with pytest.raises(ManifestError, match=match):
        write_manifest(table, str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()
    # the same file written behind the validator's back fails on read, naming the row
    pq.write_table(table, tmp_path / "raw.parquet")
    with pytest.raises(ValueError, match=match):
        read_manifest(str(tmp_path / "raw.parquet"))


def test_missing_required_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"clip_id": ["a"], "label": ["sad"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['video_uri'\]"):
        read_manifest(str(tmp_path / "m.parquet"))


# --- importer -------------------------------------------------------------------------------------------
def test_normalise_label_aliases() -> None:
    assert [normalise_label(x) for x in ("Worry", " worried ", "SURPRISED", "Happy", "anger", "", None, "nan")] == \
        ["worried", "worried", "surprise", "happy", "angry", None, None, None]
    assert normalise_label("Contempt") == "Contempt"  # unknown: returned for the caller to report


def _check_import_of_synth(summary: dict, synth_root: Path, manifest: pa.Table) -> None:
    truth = {r["name"]: r for r in _rows(synth_root / "synth_truth.csv")}
    missing_name = next(n for n, r in truth.items() if r["broken"] == "missing_video")
    # conftest synth: 36 train, 12 unlabelled (one of them without a video file), 12 test
    assert summary["splits"] == {"train": 36, "unlabeled": 12, "test": 12}
    assert summary["n_rows"] == manifest.num_rows == 60
    assert summary["n_missing_video"] == 1 and summary["missing_by_split"] == {"unlabeled": 1}
    assert summary["n_missing_kept"] == 1  # a candidate: kept, so that the submission covers it
    assert summary["train_labels"] == dict.fromkeys(summary["train_labels"], 6)
    assert summary["text_source"] == {"chinese": 59, "english": 0, "none": 1}  # the empty-subtitle clip
    status = dict(zip(manifest.column("clip_id").to_pylist(), manifest.column("video_status").to_pylist()))
    assert status.pop(missing_name) == "missing_file" and set(status.values()) == {"ok"}
    # same clips, labels, splits and texts as the generator's own manifest
    own = {r["clip_id"]: r for r in pq.read_table(synth_root / "manifest.parquet").to_pylist()}
    assert set(own) == set(manifest.column("clip_id").to_pylist())
    for r in manifest.to_pylist():
        o = own[r["clip_id"]]
        assert (r["label"], r["split"]) == (o["label"], o["split"])
        assert (r["text"] or "") == (o["text"] or "")
        assert r["video_uri"].endswith(f"video/{r['clip_id']}.mp4")


def test_import_synth_release(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "manifest.parquet"
    summary = import_mer2025(str(synth_root), str(out))
    manifest = read_manifest(str(out))
    _check_import_of_synth(summary, synth_root, manifest)
    assert summary["train_csv"].endswith("track1_train_disdim.csv")
    assert summary["test_csv"].endswith("test_labels.csv")
    missing = _rows(tmp_path / "out" / "manifest.missing.csv")
    truth = {r["name"]: r for r in _rows(synth_root / "synth_truth.csv")}
    assert [m["name"] for m in missing] == [n for n, r in truth.items() if r["broken"] == "missing_video"]
    assert missing[0]["split"] == "unlabeled" and missing[0]["reason"] == "video file not found"
    assert missing[0]["kept"] == "True"
    assert all(Path(r["video_uri"]).exists() == (r["video_status"] == "ok") for r in manifest.to_pylist())

    # keep_missing="none" drops the row, still reported; no test split on demand
    dropped = import_mer2025(str(synth_root), str(tmp_path / "dropped.csv"), keep_missing="none", test_labels=False)
    assert dropped["n_rows"] == 59 and dropped["n_missing_video"] == 1 and dropped["n_missing_kept"] == 0
    assert dropped["splits"] == {"train": 36, "unlabeled": 23, "test": 0}
    assert read_manifest(str(tmp_path / "dropped.csv")).num_rows == 59
    assert _rows(tmp_path / "dropped.missing.csv")[0]["kept"] == "False"
    with pytest.raises(ValueError, match="keep_missing must be one of"):
        import_mer2025(str(synth_root), str(tmp_path / "x.csv"), keep_missing="some")


def _mer2026_release(root: Path, unknown: bool = False) -> None:
    """MER2026 naming: track1_train.csv (name,discrete) with capitalised/alias labels,
    track1_track2_candidate.csv; videos as .mp4 and .avi; one candidate without video; English fallback."""
    labels = ["Happy", "worry", "Surprised", "neutral"] + (["Contempt"] if unknown else [])
    train = [[f"t{i}", lab] for i, lab in enumerate(labels)]
    _csv(root / "track1_train.csv", ["name", "discrete"], train)
    _csv(root / "track1_track2_candidate.csv", ["name"], [["c0"], ["c1"], ["c2"]])
    _csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"],
         [["t0", "太好了", "great"], ["t1", "", "I am worried"], ["t2", "天哪", ""], ["c0", "", ""],
          ["c1", "好", "ok"]])
    (root / "video").mkdir(parents=True, exist_ok=True)
    for name in ("t0", "t1", "t3", "c0", "c1"):
        (root / "video" / f"{name}.mp4").write_bytes(b"x")
    (root / "video" / "t2.avi").write_bytes(b"x")
    (root / "video" / "t3.avi").write_bytes(b"x")  # both: .mp4 wins
    (root / "video" / "notes.txt").write_text("not a clip")


def test_import_mer2026_layout_aliases_avi_and_fallback(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    _mer2026_release(root)
    s = import_mer2025(str(root), str(tmp_path / "m.parquet"))
    t = {r["clip_id"]: r for r in read_manifest(str(tmp_path / "m.parquet")).to_pylist()}
    assert s["train_csv"].endswith("track1_train.csv") and s["candidates_csv"].endswith("track1_track2_candidate.csv")
    assert s["splits"] == {"train": 4, "unlabeled": 3, "test": 0}  # c2 (no video) included
    assert {k: t[k]["label"] for k in ("t0", "t1", "t2", "t3")} == \
        {"t0": "happy", "t1": "worried", "t2": "surprise", "t3": "neutral"}
    assert s["n_aliased_labels"] == 3
    assert t["t1"]["text"] == "I am worried" and t["t0"]["text"] == "太好了" and t["c0"]["text"] is None
    assert t["t3"]["text"] is None  # no subtitle row at all
    assert s["text_source"] == {"chinese": 3, "english": 1, "none": 3}
    assert t["t2"]["video_uri"].endswith("t2.avi") and t["t3"]["video_uri"].endswith("t3.mp4")
    assert s["n_missing_video"] == 1 and [r["name"] for r in _rows(tmp_path / "m.missing.csv")] == ["c2"]


def test_import_keeps_candidates_without_video_and_drops_train_rows(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    _mer2026_release(root)
    (root / "video" / "t0.mp4").unlink()  # a labelled train clip without its video
    s = import_mer2025(str(root), str(tmp_path / "m.parquet"))
    t = {r["clip_id"]: r for r in read_manifest(str(tmp_path / "m.parquet")).to_pylist()}
    assert "t0" not in t and t["c2"]["video_status"] == "missing_file" and t["c2"]["split"] == "unlabeled"
    assert t["c2"]["video_uri"].endswith("video/c2.mp4")
    assert s["n_missing_video"] == 2 and s["n_missing_kept"] == 1
    assert s["missing_by_split"] == {"train": 1, "unlabeled": 1} and s["splits"]["train"] == 3
    report = {r["name"]: r for r in _rows(tmp_path / "m.missing.csv")}
    assert (report["t0"]["kept"], report["c2"]["kept"]) == ("False", "True")
    everything = import_mer2025(str(root), str(tmp_path / "all.parquet"), keep_missing="all")
    assert everything["n_missing_kept"] == 2 and everything["splits"]["train"] == 4


def test_import_unknown_label_error_names_row_or_skips(tmp_path: Path) -> None:
    root = tmp_path / "rel"
    _mer2026_release(root, unknown=True)
    with pytest.raises(ValueError, match=r"track1_train.csv line 6: clip 't4' has unknown label 'Contempt'"):
        import_mer2025(str(root), str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()
    s = import_mer2025(str(root), str(tmp_path / "m.parquet"), on_unknown_label="skip")
    assert s["n_unknown_label"] == 1 and s["splits"]["train"] == 4
    assert _rows(tmp_path / "m.unknown_labels.csv")[0]["name"] == "t4"


def test_import_synth_release_from_s3(synth_root: Path, s3_server: str) -> None:
    prefix = "s3://mer-test/mer2025-release"
    for p in sorted(synth_root.rglob("*")):
        if p.is_file() and p.suffix in (".csv", ".mp4"):
            storage.write_bytes(f"{prefix}/{p.relative_to(synth_root).as_posix()}", p.read_bytes())
    out = "s3://mer-test/manifests/mer2025.parquet"
    summary = import_mer2025(prefix, out)
    manifest = read_manifest(out)
    _check_import_of_synth(summary, synth_root, manifest)
    assert all(u.startswith(f"{prefix}/video/") for u in manifest.column("video_uri").to_pylist())
    assert summary["missing_report"] == "s3://mer-test/manifests/mer2025.missing.csv"
    missing = storage.read_text(summary["missing_report"]).splitlines()
    assert len(missing) == 2 and "video file not found" in missing[1]
