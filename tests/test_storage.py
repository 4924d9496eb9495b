"""Storage: the same calls work on local paths and on a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mer.store import storage


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


def test_s3_calls_share_one_client_until_endpoint_or_credentials_change(s3_server: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"s3://mer-test/shared-client-{id(monkeypatch)}"
    fs = storage.filesystem(base)[0].handler.fs
    storage.write_json(storage.join(base, "a.json"), {"v": 1})
    client = fs._s3  # built by the first call; a new filesystem per call rebuilt it every time
    assert client is not None
    assert storage.exists(storage.join(base, "a.json")) and storage.read_json(storage.join(base, "a.json")) == {"v": 1}
    storage.write_json(storage.join(base, "b.json"), {"v": 2})
    # the listing is not cached with the filesystem: a file written since is listed
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(base, ".json")] == ["a.json", "b.json"]
    assert storage.filesystem(base)[0].handler.fs is fs and fs._s3 is client

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated")  # boto's chain would read other credentials
    other = storage.filesystem(base)[0].handler.fs
    assert other is not fs and storage.exists(storage.join(base, "a.json"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.replace("127.0.0.1", "localhost"))
    assert storage.filesystem(base)[0].handler.fs not in (fs, other)
    assert storage.s3fs_filesystem(key="k", secret="s") is not storage.s3fs_filesystem(key="k", secret="t")
