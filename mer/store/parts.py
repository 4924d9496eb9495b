"""Part stores: a directory (local or ``s3://``) of Parquet parts holding one row per key (``clip_id``).

The feature store, predictions (``mer score`` and the label loop's pool scores) and the enrichment cache are
part stores; every reader of them goes through this module.

Exactly-once protocol: only the driver commits, and only whole parts (:func:`write_part` is atomic: temp file
+ rename locally, one PUT on S3), so a part is either complete or absent. A run first reads the keys of the
committed parts (:func:`stored_ids`) and only processes the others (:mod:`mer.runtime.stream`); a run killed mid-way
loses just its uncommitted buffer, which the next run redoes. :class:`PartWriter` names parts per run
(``part-<run>-<seq>.parquet``) so runs never overwrite each other, and in commit order. Readers deduplicate by
key (the first committed part wins), so even two concurrent runs cannot yield a duplicate row.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mer.store import storage
from mer.store.data_context import data_context

PART_PREFIX = "part-"
KEY = "clip_id"
META_FILE = "_meta.json"  # a feature store's provenance (mer.extract.schema): config hash, settings, model ids


class PartStore:
    """A part store opened once: its URI, and what reading it needs, each read lazily and at most once: the
    committed parts (one listing), the schema (the first part's footer), ``_meta.json`` and the stored keys.

    A command opens the store it reads once and passes the value down instead of the URI, so the functions it
    calls share one listing. The value is a snapshot: parts committed after the listing are not in it. A store
    that changes while a command runs (the output of a stream, an enrichment cache) is opened again where it
    must be seen anew (``PartStore(uri)``, or the module functions with a URI, which list it every call).
    Safe to share between threads (the label loop trains runs side by side on one store); pickles without
    its lock.
    """

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        self._cache: dict[Any, Any] = {}
        self._lock = threading.RLock()

    @classmethod
    def of(cls, store: str | PartStore) -> PartStore:
        """``store`` itself when it is already open, else the store at that URI, opened (lazily)."""
        return store if isinstance(store, PartStore) else cls(store)

    def __repr__(self) -> str:
        return f"PartStore({self.uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"uri": self.uri, "_cache": dict(self._cache)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _once(self, key: Any, read: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = read()
            return self._cache[key]

    @property
    def parts(self) -> list[str]:
        """The committed parts, in commit order (a single Parquet file is a store of one part); [] when none."""
        return list(self._once("parts", lambda: _list_parts(self.uri)))

    def _nonempty(self) -> list[str]:
        files = self.parts
        if not files:
            raise FileNotFoundError(f"no Parquet parts under {self.uri}")
        return files

    @property
    def schema(self) -> pa.Schema:
        """The store's schema: its first part's (FileNotFoundError when it has no part)."""
        return self.part_schema(self._nonempty()[0])

    @property
    def columns(self) -> list[str]:
        """Column names of the store (its first part's schema)."""
        return self.schema.names

    def part_schema(self, part: str) -> pa.Schema:
        """The schema of one part (read from its footer once)."""

        def read() -> pa.Schema:
            fs, path = storage.filesystem(part)
            return pq.read_schema(path, filesystem=fs)

        return self._once(("schema", part), read)

    @property
    def meta(self) -> dict[str, Any] | None:
        """The store's ``_meta.json`` (a feature store's config hash, settings, model ids); None without one."""

        def read() -> dict[str, Any] | None:
            path = storage.join(self.uri, META_FILE)
            return storage.read_json(path) if storage.exists(path) else None

        return self._once("meta", read)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``_meta.json`` (atomically) and keep it as this value's meta."""
        storage.write_json(storage.join(self.uri, META_FILE), meta)
        with self._lock:
            self._cache["meta"] = meta

    def part_keys(self, part: str, key: str = KEY) -> list[Any]:
        """The keys of one part, in row order (read once)."""
        return self._once(("keys", part, key),
                          lambda: storage.read_table(part, columns=[key]).column(key).to_pylist())

    def ids(self, key: str = KEY) -> set[Any]:
        """Keys committed to the store (empty for a new store)."""

        def read() -> set[Any]:
            out: set[Any] = set()
            for p in self.parts:
                out.update(self.part_keys(p, key))
            return out

        return set(self._once(("ids", key), read))

    def iter(self, columns: list[str] | None = None, key: str | None = KEY) -> Iterator[pa.Table]:
        """The store's parts one at a time (bounded memory), each without the rows whose key an earlier part
        (or an earlier row) already holds. ``columns`` narrows the read (the key is always read, first; a column
        a part lacks is skipped); ``key=None`` reads every row as it is."""
        seen: set[Any] = set()
        cols = None if columns is None else list(dict.fromkeys([key, *columns] if key else columns))
        for p in self._nonempty():
            names = self.part_schema(p).names
            table = storage.read_table(p, columns=None if cols is None else [c for c in cols if c in names])
            if key is None:
                yield table
                continue
            keys = table.column(key).to_pylist()
            with self._lock:  # the keys came with the rows: a later ids() or dataset() needs no read of its own
                self._cache.setdefault(("keys", p, key), keys)
            keep = []
            for i, k in enumerate(keys):
                if k not in seen:
                    seen.add(k)
                    keep.append(i)
            yield table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))

    def read(self, columns: list[str] | None = None, key: str | None = KEY) -> pa.Table:
        """All rows, one per key (:meth:`iter`), as one table (schemas unified)."""
        return pa.concat_tables(list(self.iter(columns, key)), promote_options="default")

    def dataset(self, columns: list[str] | None = None, key: str = KEY) -> Any:
        """The store as a Ray Dataset (lazy), one row per key like :meth:`read`: rows whose key an earlier part
        holds are dropped. Only the keys pass through the driver (to find such rows; read once per value)."""
        import ray

        files = self._nonempty()
        drop: dict[str, set[str]] = {}
        seen: set[str] = set()
        for f in files:
            ids = self.part_keys(f, key)
            again = {k for k in ids if k in seen}
            if again:
                drop[storage.ray_path(f)] = again
            seen.update(ids)
        # Ray 2.60 plans read_parquet as a DataSourceV2 read by default, which lists the files through a pool of
        # footer-reading actors (32 by default) on every read, for pushdown over large listings. A part store is
        # read whole from files it already knows, so that pool is pure start-up cost (six reads of a 4-part store
        # on a 2-CPU local Ray: 26.6 s with it, 5.7 s with the V1 read).
        with data_context(use_datasource_v2=False):
            ds = ray.data.read_parquet([storage.ray_path(f) for f in files],
                                       filesystem=storage.ray_filesystem(self.uri), include_paths=bool(drop))
        if columns is not None:
            ds = ds.select_columns(list(dict.fromkeys([key, *columns, *(["path"] if drop else [])])))
        if drop:
            ds = ds.map_batches(_drop_rows, fn_kwargs={"drop": drop, "key": key}, batch_format="pyarrow")
        return ds


def _list_parts(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return [uri]
    return [p for p in storage.list_files(uri, ".parquet") if p.rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def _drop_rows(batch: pa.Table, drop: dict[str, set[str]], key: str) -> pa.Table:
    paths = batch.column("path").to_pylist()
    keys = batch.column(key).to_pylist()
    keep = pa.array([k not in drop.get(p, ()) for p, k in zip(paths, keys)], pa.bool_())
    return batch.filter(keep).drop_columns(["path"])


# The functions below take a URI (listed anew on every call, as a store that is being written must be) or an
# open PartStore (its listing and reads shared with the caller's other calls).

def part_files(store: str | PartStore) -> list[str]:
    """The committed parts of a store, in commit order (a single Parquet file is a store of one part)."""
    return PartStore.of(store).parts


def write_part(uri: str, table: pa.Table, name: str | None = None) -> str:
    """Commit ``table`` as one part of the store ``uri`` (atomically); returns the part's URI."""
    part = storage.join(uri, name or f"{PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_table(part, table)
    return part


def part_columns(store: str | PartStore) -> list[str]:
    """Column names of the store (its first part's schema)."""
    return PartStore.of(store).columns


def stored_ids(store: str | PartStore, key: str = KEY) -> set[str]:
    """Keys already committed to the store (empty for a new store)."""
    return PartStore.of(store).ids(key)


def iter_parts(store: str | PartStore, columns: list[str] | None = None, key: str | None = KEY
               ) -> Iterator[pa.Table]:
    """:meth:`PartStore.iter`: the parts one at a time, one row per key."""
    return PartStore.of(store).iter(columns, key)


def read_parts(store: str | PartStore, columns: list[str] | None = None, key: str | None = KEY) -> pa.Table:
    """:meth:`PartStore.read`: all rows of a store, one per key, as one table (schemas unified)."""
    return PartStore.of(store).read(columns, key)


def read_dataset(store: str | PartStore, columns: list[str] | None = None, key: str = KEY) -> Any:
    """:meth:`PartStore.dataset`: the store as a Ray Dataset (lazy), one row per key."""
    return PartStore.of(store).dataset(columns, key)


class PartWriter:
    """Driver-side buffer that commits full parts of ``rows_per_part`` rows atomically.

    ``add`` drops rows whose key is already stored or already seen in this run, which is what makes a retried
    Ray task or a resumed run unable to produce a duplicate row.
    """

    def __init__(self, uri: str, schema: pa.Schema, rows_per_part: int, already: set[str] | None = None,
                 key: str = KEY) -> None:
        self.uri, self.schema, self.rows_per_part, self.key = uri, schema, rows_per_part, key
        self.seen: set[str] = set(already or ())
        self.run = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.rows_written = 0
        self.duplicates_dropped = 0

    def add(self, table: pa.Table) -> None:
        ids = table.column(self.key).to_pylist()
        keep = []
        for i, cid in enumerate(ids):
            if cid in self.seen:
                self.duplicates_dropped += 1
            else:
                self.seen.add(cid)
                keep.append(i)
        if len(keep) != len(ids):
            table = table.take(pa.array(keep, pa.int64()))
        if table.num_rows == 0:
            return
        self.buffer.append(table.select(self.schema.names).cast(self.schema))
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_part:
            self._commit(self.rows_per_part)

    def _commit(self, n: int) -> None:
        data = pa.concat_tables(self.buffer)
        part, rest = data.slice(0, n), data.slice(n)
        self.parts.append(write_part(self.uri, part, f"{PART_PREFIX}{self.run}-{len(self.parts):05d}.parquet"))
        self.rows_written += part.num_rows
        self.buffer = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def flush(self) -> None:
        """Commit whatever is buffered (the last, possibly short, part)."""
        if self.buffered:
            self._commit(self.buffered)
