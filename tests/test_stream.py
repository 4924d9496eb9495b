"""The resume-and-commit loop (:func:`mer.runtime.stream.write_stream`): a stream Ray aborts starts again over the keys
not yet committed and every key ends with exactly one row; an error of the code is never retried.

The failures are real: a ``map_batches`` task of the test's own stream exits its worker process (what a lost
node does to the work on it), with no retries left, so Ray Data aborts the stream."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.runtime.stream import restartable, write_stream
from mer.store.parts import part_files

import waiting
from waiting import wait_for

SCHEMA = pa.schema([("clip_id", pa.string()), ("value", pa.int64())])
KEYS = [f"k{i:02d}" for i in range(12)]
VICTIM = KEYS[-1]


def _fail_once(batch: pa.Table, marks: str, how: str) -> pa.Table:
    """Rows get their value; the victim's batch fails the first time, after the driver has received a batch
    (so the failure lands mid-stream): ``how="crash"`` exits the worker process, ``"user"`` raises."""
    m = Path(marks)
    if VICTIM in batch.column("clip_id").to_pylist() and not (m / "failed").exists():
        wait_for("the driver to receive a batch", (m / "received").exists, 120)
        (m / "failed").write_text(how)
        if how == "crash":
            os._exit(1)
        raise ValueError(f"bad input {VICTIM}")
    return batch.append_column("value", pa.array([int(k[1:]) for k in batch.column("clip_id").to_pylist()]))


def _run(tmp_path: Path, how: str, calls: list[list[str]], restarts: int = 2):
    import ray
    import ray.cloudpickle

    # Ray's workers cannot import this test module: ship _fail_once by value (with the wait_for it uses).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(waiting)
    marks = tmp_path / "marks"
    marks.mkdir()

    def stream(pending: list[str]):
        calls.append(list(pending))
        ds = ray.data.from_items([{"clip_id": k} for k in pending], override_num_blocks=len(pending))
        # No retries: the crash aborts the stream, as a task whose retries are spent does.
        return ds.map_batches(_fail_once, fn_kwargs={"marks": str(marks), "how": how}, batch_size=1,
                              batch_format="pyarrow", max_retries=0)

    def on_batch(batch: pa.Table) -> pa.Table:
        (marks / "received").touch()
        return batch

    return write_stream(str(tmp_path / "out"), SCHEMA, 2, KEYS, stream, on_batch, restarts=restarts)


@pytest.mark.timeout(300)
def test_stream_aborted_by_ray_restarts_and_writes_every_key_once(ray_local, tmp_path: Path, caplog) -> None:
    calls: list[list[str]] = []
    with caplog.at_level(logging.WARNING, logger="mer.stream"):
        result = _run(tmp_path, "crash", calls)
    assert (tmp_path / "marks" / "failed").exists()  # the first attempt did crash
    assert result.restarts == 1 and len(calls) == 2
    # The restart streamed only the keys not yet committed (the driver had received some before the crash).
    assert VICTIM in calls[1] and len(calls[1]) < len(KEYS) and set(calls[1]) <= set(KEYS)
    raw = pa.concat_tables([pq.read_table(p) for p in part_files(str(tmp_path / "out"))])
    assert sorted(raw.column("clip_id").to_pylist()) == KEYS  # every key, exactly once (no duplicate rows)
    assert dict(zip(raw.column("clip_id").to_pylist(), raw.column("value").to_pylist())) == \
        {k: int(k[1:]) for k in KEYS}
    assert [r.getMessage() for r in caplog.records if "restart 1 of 2" in r.getMessage()]


@pytest.mark.timeout(300)
def test_user_error_in_a_stream_is_not_restarted(ray_local, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    with pytest.raises(Exception, match=f"bad input {VICTIM}") as err:
        _run(tmp_path, "user", calls)
    assert not restartable(err.value)
    assert len(calls) == 1


def test_restartable_tells_ray_losses_from_code_errors() -> None:
    from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError, UserCodeException, WorkerCrashedError

    assert restartable(ActorDiedError()) and restartable(WorkerCrashedError()) and restartable(NodeDiedError("n"))
    assert restartable(RayTaskError("f", "tb", ActorDiedError()))  # a task that lost an actor it called
    assert not restartable(RayTaskError("f", "tb", ValueError("bad clip")))
    assert not restartable(UserCodeException("udf")) and not restartable(ValueError("bad config"))
