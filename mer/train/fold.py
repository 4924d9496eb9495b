"""One group of folds = one Ray Train ``TorchTrainer`` run (DeepSpeed inside), checkpointed under
``<out>/ray/folds_<k>_<k2>…`` (:func:`group_name`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mer.config import MerConfig
from mer.store import storage
from mer.train.worker import fit_dir, train_loop_per_worker

log = logging.getLogger("mer.train")

def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``RunConfig(storage_path, storage_filesystem)`` for a local path or an ``s3://`` URI.

    For S3 this is the project's s3fs filesystem (the one every other stage uses), with the endpoint and,
    when set in the environment, the credentials baked in: it is pickled to the Ray Train controller and
    workers, whose environment may predate them. pyarrow's native S3 client is not used here: inside
    the Ray Train controller its CompleteMultipartUpload of the storage marker failed against
    S3-compatible endpoints (INTERNAL_FAILURE on a 200 reply), while s3fs writes small objects with
    a single PUT.
    """
    if not storage.is_s3(uri):
        return os.path.abspath(os.path.expanduser(uri)), None
    creds = ({"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
              "token": os.environ.get("AWS_SESSION_TOKEN")}
             if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY") else {})
    fs = storage.s3fs_filesystem(**creds)
    return uri[len("s3://"):], pafs.PyFileSystem(pafs.FSSpecHandler(fs))


_POLL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_PREEMPTION_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_env_lock = threading.Lock()
_env_users = 0  # runs inside controller_poll_interval at the moment (runs may overlap in threads)
_env_owned: dict[str, str] = {}  # the variables the first of them set (the last one out removes them)


@contextlib.contextmanager
def controller_poll_interval(seconds: float, *, preemption_watcher: bool = True) -> Iterator[None]:
    """How often the Ray Train controller polls workers (its default, 2 s, also paces every report:
    a worker's report waits until the previous one was consumed), and whether it starts its preemption watcher
    (an actor per worker group that polls Ray for nodes being drained: a process of its own, started while the
    workers import, that buys nothing on a local Ray where no node is ever drained). Ray Train forwards these
    variables from the driver to the controller; a value the user set in the environment wins. Runs trained at
    the same time (threads of one driver) share the process environment: the first sets the variables, the last
    one out removes them."""
    global _env_users
    wanted = {_POLL_VAR: str(seconds), **({} if preemption_watcher else {_PREEMPTION_VAR: "0"})}
    with _env_lock:
        if _env_users == 0:
            _env_owned.clear()
            _env_owned.update({k: v for k, v in wanted.items() if k not in os.environ})
            os.environ.update(_env_owned)
        _env_users += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:
                for k in _env_owned:
                    os.environ.pop(k, None)
                _env_owned.clear()


def group_name(folds: list[int]) -> str:
    """The Ray Train run name of a group of folds trained by one trainer (``folds_0_2_4``): a resumed run finds
    the group's checkpoints under the same name as long as the same folds are left to train together."""
    return "folds_" + "_".join(str(k) for k in folds)


Targets = dict[str, tuple[int, float]]  # clip id -> (label index, sample weight)


def fit_spec(key: str, fold: int, *, train: dict[str, Any], arch: str, dims: dict[str, int],
             targets: tuple[Targets, Targets], input_stats: tuple[list[float], list[float]] | None = None,
             run: str | None = None) -> dict[str, Any]:
    """One fit of a job (:func:`run_fits`): a run's fold ``fold``, its model (``arch``, ``dims`` in model order, the
    ``train`` section as JSON), its (training, validation) clips with label index and weight, and the input
    statistics. ``key`` names it in the job's checkpoints (``fold_<key>/``) and reports; ``run`` says whose it is.
    The ids, labels and weights (not the vectors) pass through the driver: each worker picks its rows of the one
    dataset by id, so that a restarted worker group sees the rows the first one saw (worker.shard_ids)."""
    tr, va = targets
    return {"key": str(key), "fold": int(fold), "run": run, "arch": arch, "dims": dict(dims), "train": train,
            "input_stats": input_stats,
            "targets": {"train": [list(tr), [t[0] for t in tr.values()], [t[1] for t in tr.values()]],
                        "val": [list(va), [t[0] for t in va.values()]]}}


def job_name(keys: list[str]) -> str:
    """The Ray Train run name of a job of fits from several runs: stable for the same fits, so a resumed job
    finds its checkpoints."""
    return "fits_" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def run_fits(cfg: MerConfig, fits: list[dict[str, Any]], *, dataset: Any = None, rows: Any = None, ray_dir: str,
             name: str, max_failures: int | None = None, callbacks: list[Any] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Train a job's fits (:func:`fit_spec`), one after the other, in one Ray Train run (one worker group) named
    ``name`` under ``ray_dir``; returns per fit key ``state`` (history, best epoch...), ``best`` (state-dict
    bytes), ``val_pred`` (table), ``checkpoint_path`` and ``group_timing``, from the job's final checkpoint.
    ``dataset``: the store's rows (clip id and every modality the fits use), one Ray dataset for every fit; or
    ``rows``: the same rows as one Arrow table in the object store (an object ref: a small store read on the
    driver, ``train.driver_rows_mb``), handed to the workers in the loop's config instead of a dataset.
    ``cfg.train`` sizes the worker group (resources, failures, checkpoints kept).

    One trainer for many fits pays the worker group's start-up (processes, torch and DeepSpeed imports, the
    process group, the data hand-over, one DeepSpeed engine per model shape) once instead of once per fit;
    each fit still starts from its own initial weights and a fresh optimizer state. Re-running with the same
    ``ray_dir`` and ``name`` continues from the job's latest checkpoint (Ray Train restores its checkpoint
    snapshot for the same storage path and run name): finished fits are not trained again, the first
    unfinished one continues at its next epoch. ``callbacks`` are Ray Train ``UserCallback``s of the job's
    controller (``RunConfig(callbacks)``): they see every epoch's report, whose metrics include the fold, the fit
    key, the run and each worker's process id (``pid``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if (dataset is None) == (rows is None):
        raise ValueError("run_fits: pass the rows as a Ray dataset or as an object ref of a table, one of them")
    tc = cfg.train
    storage_path, fs = ray_storage(ray_dir)
    gpu = tc.resources.num_gpus > 0
    loop_config = {"fits": fits, "threads": max(1, int(tc.resources.num_cpus)), "rows": rows}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=tc.resources.scaling_config(),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures if max_failures is None else max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
            callbacks=list(callbacks or []),
        ),
        datasets={"features": dataset} if dataset is not None else None,
        # Nothing is split by Ray Data: every worker validates on the whole (small) validation fold, so all
        # reach the same WAF, and keeps its own training rows of the whole training set by clip id.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    t0 = time.time()
    result = trainer.fit()
    t1 = time.time()
    log.debug("%s: trainer.fit %.1f s", name, t1 - t0)
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training produced no checkpoint ({result.error})")
    removed = remove_unregistered_checkpoints(ray_dir, name, [result.checkpoint.path,
                                                              *(c.path for c, _ in result.best_checkpoints or [])])
    if removed:
        log.info("%s: removed %d checkpoint directories no restart registered: %s", name, len(removed), removed)
    out: dict[str, dict[str, Any]] = {}
    with result.checkpoint.as_directory() as d:
        saved = json.loads((Path(d) / "state.json").read_text())
        states = saved["fits"]
        # Where the job's wall time went: the trainer's start (controller, worker processes, process group)
        # up to the loop, the loop's imports and data hand-over (the latest attempt's), the trainer's end.
        startup = saved.get("startup") or {}
        timing = {"fit_s": t1 - t0, "group_start_s": startup.get("loop_at", t0) - t0,
                  "imports_s": startup.get("imports_s", 0.0), "data_s": startup.get("data_s", 0.0)}
        for f in fits:
            key = f["key"]
            state = states.get(key)
            if not state or not state.get("finished"):
                raise RuntimeError(f"fit {key}: latest checkpoint of {name} has not finished it "
                                   f"(epoch {(state or {}).get('epoch')})")
            own = Path(d) / fit_dir(key)
            out[key] = {"state": state, "best": (own / "best.pt").read_bytes(),
                        "val_pred": pq.read_table(io.BytesIO((own / "val_pred.parquet").read_bytes())),
                        "checkpoint_path": result.checkpoint.path, "group_timing": timing}
            log.debug("fit %s: best val WAF %.4f at epoch %d (%d epochs, resumed from %s)", key, state["best_waf"],
                      state["best_epoch"], state["epoch"], state["resumed_from"])
    return out


def run_folds(cfg: MerConfig, *, folds: list[int], arch: str, dims: dict[str, int], dataset: Any,
              targets: dict[int, tuple[Targets, Targets]], ray_dir: str, max_failures: int | None = None,
              input_stats: tuple[list[float], list[float]] | None = None,
              callbacks: list[Any] | None = None) -> dict[int, dict[str, Any]]:
    """A group of one run's folds as one job (:func:`run_fits`, named :func:`group_name` under ``ray_dir``);
    returns per fold what :func:`run_fits` returns per fit. ``targets``: fold -> (training, validation) clips
    with their label index and weight (every clip a row of ``dataset``)."""
    train = cfg.train.model_dump(mode="json")
    fits = [fit_spec(str(k), k, train=train, arch=arch, dims=dims, targets=targets[k], input_stats=input_stats)
            for k in folds]
    res = run_fits(cfg, fits, dataset=dataset, ray_dir=ray_dir, name=group_name(folds), max_failures=max_failures,
                   callbacks=callbacks)
    return {k: res[str(k)] for k in folds}


def checkpoint_dirs(ray_dir: str, name: str) -> list[str]:
    """Checkpoint directory names kept for the group of folds ``name`` (:func:`group_name`; for tests and
    reports)."""
    storage_path, fs = ray_storage(ray_dir)
    fs = fs or pafs.LocalFileSystem()
    base = f"{storage_path}/{name}"
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                  and i.base_name.startswith("checkpoint"))



def remove_unregistered_checkpoints(ray_dir: str, name: str, registered: list[str]) -> list[str]:
    """Delete the checkpoint directories of the group ``name`` (:func:`group_name`) that Ray Train never
    registered; returns their names.

    When a worker group dies after its workers uploaded an epoch's checkpoint but before the controller
    registered it, the restarted group resumes from the previous registered checkpoint and the uploaded
    one is never referenced again: ``CheckpointConfig(num_to_keep)`` only prunes registered checkpoints.
    The registered ones stay (Ray Train's snapshot refers to them, a resume checks they exist).
    """
    storage_path, fs = ray_storage(ray_dir)
    fs = fs or pafs.LocalFileSystem()
    keep = {p.rstrip("/").rsplit("/", 1)[-1] for p in registered}
    removed = [d for d in checkpoint_dirs(ray_dir, name) if d not in keep]
    for d in removed:
        fs.delete_dir(f"{storage_path}/{name}/{d}")
    return removed
