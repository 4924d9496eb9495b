"""Local paths and ``s3://`` URIs behind one interface (pyarrow filesystems, s3fs for S3).

Credentials come from the environment (AWS_ACCESS_KEY_ID/...); they are never logged. The S3 endpoint
can be overridden (config ``storage.s3_endpoint_url`` or ``AWS_ENDPOINT_URL``) for S3-compatible stores.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_ENDPOINT: str | None = None
_REGION: str | None = None


def configure(s3_endpoint_url: str | None = None, s3_region: str | None = None) -> None:
    """Set process-wide S3 endpoint/region overrides (from config); env vars still apply when unset."""
    global _ENDPOINT, _REGION
    _ENDPOINT, _REGION = s3_endpoint_url, s3_region
    if s3_endpoint_url:
        # Ray workers and subprocesses inherit the override through the environment.
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    if s3_region:
        os.environ.setdefault("AWS_DEFAULT_REGION", s3_region)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def endpoint_url() -> str | None:
    return _ENDPOINT or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")


# What boto's credential chain reads from the environment: a cached filesystem is only reused while these match.
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
_S3FS: dict[tuple[Any, ...], Any] = {}
_S3FS_LOCK = threading.Lock()


def s3fs_filesystem(**credentials: Any) -> Any:
    """An ``s3fs.S3FileSystem`` honouring the endpoint override, one per process for the same endpoint, region
    and credentials (listing cache off: stale listings break resume).

    Reused because each new instance builds its own botocore client on first use (endpoint tables, service
    model, TLS context: 0.2-0.5 s of CPU on a 2-core box), which every ``exists``/``read_json`` paid before.
    ``credentials`` (key/secret/token) are passed through when given; otherwise boto's chain applies.
    """
    import s3fs

    kwargs: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False,
                              **{k: v for k, v in credentials.items() if v}}
    ep = endpoint_url()
    client_kwargs: dict[str, Any] = {}
    if ep:
        client_kwargs["endpoint_url"] = ep
    region = _REGION or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        kwargs["client_kwargs"] = client_kwargs
    # Cached here, not by fsspec (whose instance cache is per thread, so Ray Data's and Tune's threads would
    # each build a client); keyed by pid: a forked child must not use its parent's client (fsspec gives the
    # child a new event loop).
    key = (os.getpid(), json.dumps(kwargs, sort_keys=True, default=str),
           tuple(os.environ.get(v) for v in _CREDENTIAL_VARS))
    with _S3FS_LOCK:
        fs = _S3FS.get(key)
        if fs is None:
            fs = _S3FS[key] = s3fs.S3FileSystem(**kwargs)
        return fs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to a pyarrow filesystem and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(s3fs_filesystem())), uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' for S3 and os.path for local paths."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files (URIs) directly under a directory whose name ends with ``suffix``; [] if it is missing."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix):
            out.append(join(uri, info.base_name))
    return sorted(out)


def copy_dir(src: str, dst: str, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under ``src`` to the same relative path under ``dst`` (each written atomically), leaving
    out the top-level entries named in ``skip``; returns the number of files copied."""
    fs, path = filesystem(src)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such directory: {src}")
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = info.path[len(path.rstrip("/")) + 1:]
        if info.type != pafs.FileType.File or rel.split("/", 1)[0] in skip:
            continue
        write_bytes(join(dst, *rel.split("/")), read_bytes(join(src, *rel.split("/"))))
        n += 1
    return n


def delete_dir(uri: str) -> None:
    """Remove the directory ``uri`` and everything under it (nothing when it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: S3 PUTs are atomic; local files go through a temp file + rename."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_table(uri: str, table: pa.Table) -> None:
    """Write one Parquet file atomically (readers never see a partial part)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet parts (parts are concatenated, schemas unified)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    if info.type == pafs.FileType.File:
        return pq.read_table(path, filesystem=fs, columns=columns)
    parts = [p for p in list_files(uri, ".parquet")]
    if not parts:
        raise FileNotFoundError(f"no Parquet parts under {uri}")
    tables = [read_table(p, columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="default")


def ray_filesystem(uri: str) -> pafs.FileSystem | None:
    """Filesystem argument for ``ray.data.read_*``/``write_*`` (None for local paths)."""
    if is_s3(uri):
        return filesystem(uri)[0]
    return None


def ray_path(uri: str) -> str:
    """Path argument for ``ray.data`` readers paired with :func:`ray_filesystem`."""
    return filesystem(uri)[1]
