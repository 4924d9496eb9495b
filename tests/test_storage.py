"""Storage: the same calls work on local paths and on a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mer import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_roundtrip(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "s3":
        request.getfixturevalue("s3_server")
        base = f"s3://mer-test/storage-{tmp_path.name}"
    else:
        base = str(tmp_path / "store")
    table = pa.table({"clip_id": ["a", "b"], "x": [1.0, 2.0]})
    storage.write_table(storage.join(base, "part-0.parquet"), table)
    storage.write_table(storage.join(base, "part-1.parquet"), pa.table({"clip_id": ["c"], "x": [3.0]}))
    storage.write_json(storage.join(base, "_meta.json"), {"v": 1})
    assert storage.exists(storage.join(base, "_meta.json"))
    assert not storage.exists(storage.join(base, "nothing"))
    assert [p.rsplit("/", 1)[-1] for p in storage.list_files(base, ".parquet")] == ["part-0.parquet", "part-1.parquet"]
    back = storage.read_table(base)
    assert sorted(back.column("clip_id").to_pylist()) == ["a", "b", "c"]
    assert storage.read_json(storage.join(base, "_meta.json")) == {"v": 1}
    assert storage.list_files(storage.join(base, "missing-dir")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_table(storage.join(base, "missing-dir"))


def test_local_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    storage.write_bytes(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp leftovers
