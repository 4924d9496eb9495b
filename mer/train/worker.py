"""The per-worker training loop (runs inside Ray Train workers): a group's folds in turn, each with its own
DeepSpeed engine, epochs and checkpoints.

Every epoch each worker saves its DeepSpeed shard (``engine.save_checkpoint``) and rank 0 adds
``state.json`` (per fold reached: epoch, best WAF, patience counter, history) and ``fold_<k>/best.pt`` (plain
state dict of the best epoch so far); Ray Train merges the workers' files into one checkpoint directory in
``RunConfig.storage_path``. A restarted worker group (``FailureConfig``) or a resumed run finds it via
``ray.train.get_checkpoint()``, skips the finished folds and continues the unfinished one with its next epoch,
optimizer state included. A finished fold's checkpoint also holds ``fold_<k>/val_pred.parquet``: the best
model's predictions on the fold's validation rows; later checkpoints of the group carry them on.

A resumed fold continues the same run: every rank also saves ``rng_rank_<r>.json`` (torch incl. CUDA,
numpy and Python ``random`` states, taken after the epoch's validation) and restores it, and the data a rank
sees is a pure function of (seed, fold, epoch, the training clip ids, world size) — see :func:`shard_ids` —
never of the order in which Ray Data happened to produce blocks. On CPU (gloo, fp32 ZeRO checkpoints, a
fixed thread count per worker, ``train.cache_shards``) that makes a restarted or resumed fold bit-identical
to an uninterrupted one (tests/test_train_resume.py). On GPUs the same states are restored, but cuDNN
kernels and NCCL reductions need not be deterministic, so runs agree only statistically there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PROB_COLUMNS, TrainConfig
from mer.evaluation.metrics import accuracy, weighted_f1
from mer.train.features import table_inputs

DS_TAG = "ds"
RNG_FILE = "rng_rank_{rank}.json"


def deepspeed_config(tc: Any) -> dict[str, Any]:
    """DeepSpeed config from ``TrainConfig``: ZeRO stage, precision, accumulation, AdamW (torch impl)."""
    return {
        "train_micro_batch_size_per_gpu": tc.resources.batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        # torch_adam: DeepSpeed's fused CPU/GPU Adam ops are not compiled in this environment.
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": tc.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": tc.bf16},
        "gradient_clipping": 1.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _state_dict(engine: Any) -> dict[str, Any]:
    """A full fp32 CPU state dict of the engine's module (gathers ZeRO-3 partitions; collective there)."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def shard_ids(ids: list[str], world: int, rank: int, seed: int) -> set[str]:
    """The training clips of ``rank``: a seeded, equal-sized partition of ``ids`` (any order).

    Every rank gets ``len(ids) // world`` clips (the remainder, at most ``world - 1`` clips chosen by the
    seed, is left out, as Ray Data's ``streaming_split(equal=True)`` does): DeepSpeed's collectives need the
    same number of steps on every rank. Unlike Ray Data's split, which hands blocks to workers in the
    order they were produced, this depends only on the arguments, so a restarted or resumed fold feeds
    every rank the same rows as the uninterrupted run.
    """
    ordered = sorted(ids)
    per = len(ordered) // world
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in perm[rank * per:(rank + 1) * per]}


class GroupRows:
    """The rows of the store that a worker's group of folds uses (``needed`` clip ids), from the one features
    dataset every fold shares: fold membership, labels and weights come from the folds' targets, not from
    per-fold datasets.

    ``it``: the worker's shard of the features dataset (a Ray Data iterator), or the store's rows as one Arrow
    table (a small store, read on the driver and handed over through the object store: ``train.driver_rows_mb``).
    ``cache=True`` streams the dataset once per worker and keeps the needed rows' model inputs in memory as
    arrays sorted by clip id (pooled feature vectors are small; every later fold and epoch indexes them), so
    both sources give the same arrays. ``cache=False`` (a dataset only) streams it from Ray Data again for every
    epoch of every fold (local shuffle buffer; the row order then follows Ray Data's block order, so only
    ``cache=True`` makes a fold reproducible across processes).
    """

    def __init__(self, it: Any, mods: list[str], dims: dict[str, int], needed: set[str], cache: bool) -> None:
        if isinstance(it, pa.Table) and not cache:
            raise ValueError("rows handed over as a table are cached (train.cache_shards); streaming needs Ray Data")
        self.it, self.mods, self.dims, self.needed, self.cache = it, mods, dims, needed, cache
        self._arrays: tuple[list[str], np.ndarray, np.ndarray] | None = None

    def select(self, batch: pa.Table, ids: set[str] | dict[str, Any]) -> pa.Table:
        """The rows of ``batch`` whose clip id is in ``ids``."""
        return batch.filter(pa.array([c in ids for c in batch.column("clip_id").to_pylist()], pa.bool_()))

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(clip ids sorted, x, mask) of the needed rows, loaded on first use."""
        if self._arrays is None:
            ids: list[str] = []
            xs, masks = [], []
            batches = ([self.it] if isinstance(self.it, pa.Table)
                       else self.it.iter_batches(batch_size=None, batch_format="pyarrow"))
            for batch in batches:
                batch = self.select(batch, self.needed)
                ids += batch.column("clip_id").to_pylist()
                x, mask = table_inputs(batch, self.mods, self.dims)
                xs.append(x)
                masks.append(mask)
            if not xs:
                self._arrays = ([], np.zeros((0, sum(self.dims.values())), np.float32),
                                np.zeros((0, len(self.mods)), bool))
            else:
                order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
                self._arrays = ([ids[i] for i in order], np.concatenate(xs)[order], np.concatenate(masks)[order])
        return self._arrays

    def slices(self, mods: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Where ``mods`` (a subset of this group's modalities, a fit's own) sit in :meth:`arrays`: the columns
        of ``x`` and of ``mask``, in ``mods``' order."""
        start, cols, offset = {}, [], 0
        for m in self.mods:
            start[m] = offset
            offset += self.dims[m]
        for m in mods:
            cols.extend(range(start[m], start[m] + self.dims[m]))
        return np.asarray(cols, np.int64), np.asarray([self.mods.index(m) for m in mods], np.int64)


class ShardBatches:
    """Batches ``(clip_ids, x, mask, y, w)`` of one fold's rows: the clips of ``targets`` (clip id → (label
    index, weight)), restricted to ``keep`` clips if given, from the group's :class:`GroupRows`; ``mods``: the
    fit's modalities (default: all of the group's), in the fit's model order."""

    def __init__(self, rows: GroupRows, targets: dict[str, tuple[int, float]], batch_size: int, shuffle: bool,
                 keep: set[str] | None = None, mods: list[str] | None = None) -> None:
        self.rows, self.batch_size, self.shuffle = rows, batch_size, shuffle
        self.mods = list(mods or rows.mods)
        self.targets = targets if keep is None else {c: t for c, t in targets.items() if c in keep}
        self._arrays: tuple | None = None

    def _yw(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        y = np.array([self.targets[c][0] for c in ids], dtype=np.int64)
        w = np.array([self.targets[c][1] for c in ids], dtype=np.float32)
        return y, w

    def _load(self) -> tuple:
        ids, x, mask = self.rows.arrays()
        idx = np.asarray([i for i, c in enumerate(ids) if c in self.targets], np.int64)
        mine = [ids[i] for i in idx]
        if self.mods == self.rows.mods:
            return (mine, x[idx], mask[idx], *self._yw(mine))
        xcols, mcols = self.rows.slices(self.mods)
        return (mine, x[np.ix_(idx, xcols)], mask[np.ix_(idx, mcols)], *self._yw(mine))

    def epoch(self, seed: int):
        if not self.rows.cache:
            kw = ({"local_shuffle_buffer_size": max(self.batch_size * 4, 64), "local_shuffle_seed": seed}
                  if self.shuffle else {})
            for batch in self.rows.it.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", **kw):
                batch = self.rows.select(batch, self.targets)
                if batch.num_rows:
                    ids = batch.column("clip_id").to_pylist()
                    yield (ids, *table_inputs(batch, self.mods, self.rows.dims), *self._yw(ids))
            return
        if self._arrays is None:
            self._arrays = self._load()
        ids, x, mask, y, w = self._arrays
        order = np.random.default_rng(seed).permutation(len(y)) if self.shuffle else np.arange(len(y))
        for s in range(0, len(y), self.batch_size):
            idx = order[s:s + self.batch_size]
            yield [ids[i] for i in idx], x[idx], mask[idx], y[idx], w[idx]


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, numpy's global, Python ``random``) as JSON data.

    torch's state drives dropout and modality dropout; numpy's and Python's are not drawn from by the loop
    today but are saved so that a model or hook that does draw from them resumes identically too."""
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(t.numpy().tobytes()).decode() for t in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    def tensor(b64: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(b) for b in state["cuda"]])


def fit_dir(key: str) -> str:
    """A fit's folder in the job's checkpoints (``fold_<k>`` for a run's fold ``k``)."""
    return f"fold_{key}"


class Engines:
    """This worker's DeepSpeed engines, one per shape (architecture, modality sizes, model and optimizer
    settings), set up once and handed from fit to fit.

    A later fit of the same shape gets the engine with its own fresh initial weights loaded and every piece of
    training state reset to what :func:`deepspeed.initialize` leaves: the ZeRO fp32 master partitions taken
    from the new weights, the optimizer's moments and step counts cleared (AdamW creates them at its first step,
    and DeepSpeed's ZeRO-1/2 set-up does not step), the engine's step counters zeroed. A fit's result then does
    not depend on which fit ran before it on the worker (tests/test_train_engine.py). ZeRO-3 (partitioned
    parameters) and bf16 without ZeRO (DeepSpeed's own bf16 optimizer) get a fresh engine per fit.
    """

    def __init__(self, keep: int = 4) -> None:
        self.engines: dict[str, Any] = {}  # in order of last use
        self.keep = keep  # engines held at most (a study's trials come in many shapes); the oldest goes first
        self.built = 0  # engines set up by deepspeed.initialize (the rest were handed over)

    @staticmethod
    def shape(arch: str, dims: dict[str, int], tc: TrainConfig) -> str:
        """What two fits must share to share an engine: everything that sizes the model or configures DeepSpeed."""
        keep = {k: v for k, v in tc.model_dump(mode="json").items()
                if k not in ("modalities", "max_epochs", "patience", "folds", "parallel_folds", "seed",
                             "max_failures", "checkpoints_to_keep", "cache_shards", "driver_rows_mb", "fit_service",
                             "standardize_inputs",
                             "poll_interval_s", "label_smoothing")}
        return json.dumps({"arch": arch, "dims": dims, "train": keep}, sort_keys=True)

    @staticmethod
    def reusable(tc: TrainConfig) -> bool:
        return tc.zero_stage in (1, 2) or (tc.zero_stage == 0 and not tc.bf16)

    def get(self, arch: str, dims: dict[str, int], tc: TrainConfig, model: Any) -> Any:
        """An engine training ``model``'s initial weights (``model`` itself when a new engine is set up)."""
        import deepspeed

        key = self.shape(arch, dims, tc)
        engine = self.engines.get(key) if self.reusable(tc) else None
        if engine is None:
            without_inference_shm_op()
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                                  if p.requires_grad],
                                                   config=deepspeed_config(tc))
            self.built += 1
            if self.reusable(tc):
                self.engines[key] = engine
                while len(self.engines) > self.keep:
                    oldest = self.engines.pop(next(iter(self.engines)))
                    if hasattr(oldest, "destroy"):
                        oldest.destroy()
            return engine
        self.engines[key] = self.engines.pop(key)  # the most recently used goes last
        reset_engine(engine, model.state_dict())
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            if hasattr(engine, "destroy"):
                engine.destroy()
        self.engines.clear()


def without_inference_shm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory collective, which only its inference all-reduce uses.

    DeepSpeed's comm backend loads that op whenever the op counts as buildable, and on a CPU machine that means a
    JIT compile of C++ (30-70 s on two cores) into ``torch_extensions`` at a process's first engine — again whenever
    a process started from another directory finds a build made with another command — under a file lock that a
    worker killed mid-compile leaves behind for every later start to wait on. Training's collectives
    (gloo, NCCL) never go through it. ``deepspeed.ops.__compatible_ops__`` is the one dict DeepSpeed consults for
    what may be built, kept in its module so that edits to it persist; marked off there, the backend starts
    without the op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def reset_engine(engine: Any, weights: dict[str, Any]) -> None:
    """Put a ZeRO-0/1/2 engine back to the state :func:`deepspeed.initialize` would leave it in for a model with
    ``weights``: module weights and buffers, fp32 master partitions, optimizer state, step counters."""
    import torch

    with torch.no_grad():
        engine.module.load_state_dict(weights)
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        # ZeRO-1/2: the fp32 master copies of this rank's partitions, taken again from the module's weights
        # (what DeepSpeed's own load_checkpoint(load_module_only=True) calls).
        opt.refresh_fp32_params()
    inner = getattr(opt, "optimizer", opt)
    inner.state.clear()  # AdamW's moments and step: created afresh at the next step, as for a new engine
    for p in engine.module.parameters():
        p.grad = None
    for attr in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        if hasattr(engine, attr):
            setattr(engine, attr, 0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the job's fits, one after the other. ``config``: ``fits`` (in training order), each
    ``{"key", "fold", "run", "arch", "dims", "train" (TrainConfig dump), "input_stats" ([mean, std] or None),
    "targets" ({"train": [ids, y, w], "val": [ids, y]}: the fit's training and validation clips of the
    ``features`` dataset, with label indices and weights; each rank trains on its :func:`shard_ids` of the
    training clips)}``; ``threads``; ``rows``: an object ref of the store's rows as one Arrow table (a small store,
    ``train.driver_rows_mb``), else None and the rows are the ``features`` dataset.

    The checkpoint's ``state.json`` holds every fit the job reached (``{"fits": {key: state}}``), and
    ``fold_<key>/`` its best weights (and, once finished, its validation predictions); the DeepSpeed shards and
    random states are those of the fit in training. A restored job skips its finished fits and continues at the
    first unfinished one. The worker process, its imports, the data hand-over and (per shape) the DeepSpeed
    engine are paid once for all fits (:class:`Engines`)."""
    t_start = time.time()
    import ray
    import ray.train
    import torch

    import deepspeed  # noqa: F401 - imported here so that the start-up figures tell imports from the engine

    from mer.fusion import build_model  # noqa: F401 - same

    startup: dict[str, float] = {"loop_at": t_start, "imports_s": time.time() - t_start}
    fits = list(config["fits"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    states: dict[str, dict[str, Any]] = {}
    files: dict[str, bytes] = {}  # finished fits' outputs, carried into every later checkpoint of the job
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states = dict(json.loads((Path(d) / "state.json").read_text())["fits"])
            files.update(_finished_files(Path(d), states))
    todo = [f for f in fits if not states.get(f["key"], {}).get("finished")]
    targets = {f["key"]: _fold_targets(f["targets"]) for f in todo}
    # One dataset for every fit of the job: each worker reads the rows its fits use once, every modality any
    # fit uses; a fit takes its own modalities' columns.
    mods: list[str] = []
    dims: dict[str, int] = {}
    for f in fits:
        for m, d in f["dims"].items():
            if m not in dims:
                mods.append(m)
                dims[m] = int(d)
    # The rows: a small store's table from the object store (read on the driver), else this worker's shard
    # of the job's Ray dataset.
    source = ray.get(config["rows"]) if config.get("rows") is not None else ray.train.get_dataset_shard("features")
    rows = GroupRows(source, mods, dims,
                     {c for tr, va in targets.values() for c in (*tr, *va)},
                     all(bool(f["train"].get("cache_shards", True)) for f in fits))
    if rows.cache and todo:
        t0 = time.time()
        rows.arrays()  # the hand-over of the rows to this worker, timed on its own
        startup["data_s"] = time.time() - t0
    engines = Engines()
    for f in fits:
        key = f["key"]
        if states.get(key, {}).get("finished"):
            # The restored checkpoint already holds everything of this fit. Its last epoch is reported again
            # (no checkpoint) so that callbacks that follow fits to their end (a study's per-epoch score over
            # folds) hear of it.
            ray.train.report({**states[key]["history"][-1], "pid": os.getpid(), "finished": True, "restored": True,
                              "fit": key, "run": f.get("run")})
            continue
        _train_fit(f, rows, targets[key], states, files, ckpt if key in states else None, t_start, startup,
                   engines)
        t_start = time.time()
    engines.close()


def _finished_files(d: Path, states: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """The outputs (best weights, validation predictions) of the finished fits in checkpoint directory ``d``."""
    out: dict[str, bytes] = {}
    for key, st in states.items():
        if st["finished"]:
            for name in ("best.pt", "val_pred.parquet"):
                path = d / fit_dir(key) / name
                if path.exists():
                    out[f"{fit_dir(key)}/{name}"] = path.read_bytes()
    return out


SERVICE_STOP = "stop"  # what :class:`mer.train.service.FitService` puts on its queue to end a worker group


def service_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a fit service's worker group (:mod:`mer.train.service`): requests of fits taken in
    turn from the service's queue until it says :data:`SERVICE_STOP`, each answered on its client's queue.

    ``config``: ``requests`` (the service's ``ray.util.queue.Queue``), ``threads``, ``idle_s`` (how long rank 0
    waits on the queue before telling the other ranks that nothing came: they wait in a broadcast, whose timeout
    must never run out). A request: ``{"id", "store" (URI), "parts" (its part files), "mods", "dims", "fits"
    (:func:`mer.train.fold.fit_spec` dicts), "progress" (epoch reports go to the client too), "reply" (the client's
    queue)}``. Each worker reads the store's rows itself (a service takes small stores only) and keeps them, and its
    DeepSpeed engines (:class:`Engines`), for every later request on the same rows: a request pays its fits' compute.

    A request is checkpointed as soon as rank 0 takes it (``state.json`` ``request`` and the client's queue,
    pickled), then with every epoch of its fits as :func:`train_loop_per_worker` does: a restarted worker group
    (``FailureConfig``) continues the request at its first unfinished fit and answers it. An answer may come twice
    (a group restarted after answering, before its next request); clients keep the first.
    """
    t_start = time.time()
    import ray
    import ray.train
    import torch
    from ray.exceptions import RayError
    from ray.util.queue import Empty

    import deepspeed  # noqa: F401 - imported here so that the start-up figures tell imports from the engine

    from mer.fusion import build_model  # noqa: F401 - same
    from mer.store.parts import PartStore

    startup: dict[str, float] = {"loop_at": t_start, "imports_s": time.time() - t_start}
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    rank = ray.train.get_context().get_world_rank()
    requests, idle_s = config["requests"], float(config.get("idle_s", 5.0))
    engines = Engines()
    cached: dict[tuple, GroupRows] = {}
    current: dict[str, Any] | None = None
    reply: Any = None
    states: dict[str, dict[str, Any]] = {}
    files: dict[str, bytes] = {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = json.loads((Path(d) / "state.json").read_text())
            current = saved.get("request")
            if current is not None:
                states = dict(saved.get("fits", {}))
                files = _finished_files(Path(d), states)
                reply = _unpickle(saved["reply"]) if saved.get("reply") else None
    while True:
        taken = current is None
        msg: Any = current
        if rank == 0 and current is None:
            try:
                msg = requests.get(timeout=idle_s)
            except Empty:
                msg = None
            except RayError:
                msg = SERVICE_STOP  # the queue is gone: the service stopped (another group failed), so end cleanly
            if isinstance(msg, dict):
                reply = msg.pop("reply", None)
        box = [msg if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        req = box[0]
        if req is None:
            continue
        if req == SERVICE_STOP:
            break
        header = {"request": req, "reply": _pickled(reply) if rank == 0 else None}
        if taken:
            # From here a restarted group finds the request in its checkpoint.
            req["taken_at"] = time.time()
            states, files, ckpt = {}, {}, None
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    (Path(tmp) / "state.json").write_text(json.dumps({"fits": {}, "startup": startup, **header}))
                # Epoch 0 of the request's first fit: a callback that follows fits by fold and epoch sees it too.
                first = req["fits"][0] if req["fits"] else {}
                ray.train.report({"request": req["id"], "taken": True, "fit": first.get("key"),
                                  "fold": first.get("fold"), "run": first.get("run"), "epoch": 0, "pid": os.getpid()},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        current = req
        key_rows = (req["store"], tuple(req["parts"]), tuple(req["mods"]))
        data_s = 0.0  # this request's reading of the rows (none when a worker holds them already)
        if key_rows not in cached:
            t0 = time.time()
            cached.clear()  # one store's rows at a time
            table = PartStore(req["store"]).read(columns=list(req["mods"]))
            rows = GroupRows(table, list(req["mods"]), {m: int(d) for m, d in req["dims"].items()},
                             set(table.column("clip_id").to_pylist()), cache=True)
            rows.arrays()
            cached[key_rows] = rows
            data_s = time.time() - t0
        rows = cached[key_rows]

        def progress(metrics: dict[str, Any], rid: str = req["id"]) -> bool:
            return _answer(reply, {"id": rid, "progress": metrics})

        t_fits = time.time()
        cancelled = False
        for f in req["fits"]:
            key = f["key"]
            if states.get(key, {}).get("finished"):
                continue
            _train_fit(f, rows, _fold_targets(f["targets"]), states, files, ckpt if key in states else None,
                       t_fits, startup, engines, header=header,
                       on_report=progress if req.get("progress") and reply is not None else None,
                       cancellable=bool(req.get("progress")))
            t_fits = time.time()
            if states[key].get("cancelled"):
                print(f"[mer.train] request {req['id']}: its client is gone; fit {key} left at epoch "
                      f"{states[key]['epoch']}", flush=True)
                cancelled = True
                break
        if rank == 0 and reply is not None and not cancelled:
            _answer(reply, {"id": req["id"], "taken_at": req.get("taken_at"), "done_at": time.time(), "data_s": data_s,
                       "startup": dict(startup), "engines_built": engines.built,
                       "results": {f["key"]: {"state": states[f["key"]],
                                              "best": files[f"{fit_dir(f['key'])}/best.pt"],
                                              "val_pred": files[f"{fit_dir(f['key'])}/val_pred.parquet"]}
                                   for f in req["fits"]}})
        current, reply, states, files, ckpt = None, None, {}, {}, None
    engines.close()


def _answer(reply: Any, message: dict[str, Any]) -> bool:
    """Put ``message`` on a client's queue; whether it got there. A client gone since (its process ended: a Tune
    trial stopped by ASHA, a killed driver) is only logged: the group goes on with the next request."""
    from ray.exceptions import RayError

    try:
        reply.put(message)
        return True
    except RayError as e:
        print(f"[mer.train] request {message.get('id')}: its client is gone ({type(e).__name__})", flush=True)
        return False


def _pickled(obj: Any) -> str | None:
    """``obj`` (a client's Ray queue: an actor handle) as text for ``state.json``."""
    if obj is None:
        return None
    import ray.cloudpickle

    return base64.b64encode(ray.cloudpickle.dumps(obj)).decode()


def _unpickle(text: str) -> Any:
    import ray.cloudpickle

    return ray.cloudpickle.loads(base64.b64decode(text))


def _fold_targets(t: dict[str, list]) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[int, float]]]:
    """(training, validation) clip id → (label index, weight) of one fit's ``targets`` entry."""
    ids, y, w = t["train"]
    vids, vy = t["val"]
    return ({c: (int(a), float(b)) for c, a, b in zip(ids, y, w)}, {c: (int(a), 1.0) for c, a in zip(vids, vy)})


def _train_fit(fit: dict[str, Any], rows: GroupRows,
               targets: tuple[dict[str, tuple[int, float]], dict[str, tuple[int, float]]],
               states: dict[str, dict[str, Any]], files: dict[str, bytes], ckpt: Any, t_start: float,
               startup: dict[str, float], engines: Engines, header: dict[str, Any] | None = None,
               on_report: Callable[[dict[str, Any]], bool] | None = None, cancellable: bool = False) -> None:
    """One fit (a run's fold) to its end: fresh initial weights on this worker's engine of its shape (or the
    fit's state from ``ckpt``), every epoch checkpointed and reported; adds the fit's state to ``states`` and
    its outputs to ``files``. ``targets``: the fit's (training, validation) clips with their labels and weights,
    rows of ``rows``. ``header``: more of ``state.json`` (a fit service's request); ``on_report``: called on rank
    0 with every epoch's reported metrics; with ``cancellable`` (the same on every rank) its False (nobody listens
    any more: a Tune trial that ASHA stopped) ends the fit after that epoch, ``state["cancelled"]`` set."""
    import ray.train
    import torch  # lazy: torch and the fusion models load only where a model is built

    from mer.fusion import build_model

    key, fold = str(fit["key"]), int(fit["fold"])
    tc = TrainConfig.model_validate(fit["train"])
    dims: dict[str, int] = {m: int(d) for m, d in fit["dims"].items()}
    mods = list(dims)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(tc.seed * 1000 + fold)  # same initial weights on every rank
    model = build_model(fit["arch"], dims, tc)
    if fit.get("input_stats"):
        model.set_input_stats(*fit["input_stats"])
    t_engine = time.time()
    engine = engines.get(fit["arch"], dims, tc, model)
    engine_s = time.time() - t_engine
    dtype = torch.bfloat16 if tc.bf16 else torch.float32
    # What the fit really ran with, not what was asked for (every history row carries it): the process group's
    # backend (nccl on GPUs, gloo on CPUs) and the dtypes of the weights DeepSpeed trains (bfloat16 with bf16).
    ran_with = {"dist_backend": str(torch.distributed.get_backend()),
                "weights_dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.")
                                                  for p in engine.module.parameters()}))}
    torch.manual_seed(tc.seed * 1000 + fold * 10 + rank + 1)  # modality dropout differs per rank

    state: dict[str, Any] = {"fold": fold, "epoch": 0, "best_waf": -1.0, "best_epoch": 0, "bad_epochs": 0,
                             "finished": False, "history": [], "resumed_from": [], "started_at": time.time(),
                             "engine_s": engine_s}
    best: dict[str, Any] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True)
            state = dict(states[key])
            best_path = Path(d) / fit_dir(key) / "best.pt"
            if best_path.exists():
                best = torch.load(best_path, map_location="cpu", weights_only=True)
            rng_path = Path(d) / RNG_FILE.format(rank=rank)
            if rng_path.exists():
                set_rng_state(json.loads(rng_path.read_text()))
            else:  # a checkpoint written by another world size: dropout draws differ from here on
                print(f"[mer.train] fit {key} rank {rank}: checkpoint has no random state for this rank; "
                      "continuing with fresh seeds", flush=True)
        state["resumed_from"] = [*state["resumed_from"], int(state["epoch"])]
    print(f"[mer.train] fit {key} rank {rank}: engine ready in {time.time() - t_start:.1f} s "
          f"({engines.built} engine(s) set up on this worker)", flush=True)

    shuffle_seed = tc.seed * 1000 + fold * 100
    train_targets, val_targets = targets
    train_src = ShardBatches(rows, train_targets, tc.resources.batch_size, shuffle=True,
                             keep=shard_ids(list(train_targets), world, rank, shuffle_seed), mods=mods)
    val_src = ShardBatches(rows, val_targets, 256, shuffle=False, mods=mods)

    def to_t(a: np.ndarray, dt: Any = None) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return t.to(dt) if dt is not None else t

    while state["epoch"] < tc.max_epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        engine.train()
        loss_sum, n_seen = 0.0, 0
        for _, x, mask, y, w in train_src.epoch(shuffle_seed + epoch):
            logits, _ = engine(to_t(x, dtype), to_t(mask))
            # The model's own objective (weighted CE + its auxiliary heads' terms), shared with mer.train.local.
            loss = engine.module.loss(logits, to_t(y), to_t(w), tc.label_smoothing)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        train_seconds = time.time() - t0

        engine.eval()
        ids: list[str] = []
        ys, probs, weights, xs, masks = [], [], [], [], []
        with torch.no_grad():
            for batch_ids, x, mask, y, _ in val_src.epoch(0):
                logits, wts = engine(to_t(x, dtype), to_t(mask))
                probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
                weights.append(wts.float().cpu().numpy())
                ys.append(y)
                xs.append(x)
                masks.append(mask)
                ids += batch_ids
        # Clip order, so that the loss sums in the same order whatever order Ray Data delivered.
        by_id = np.argsort(np.asarray(ids, dtype=object), kind="stable")
        ids = [ids[i] for i in by_id]
        y_val = np.concatenate(ys)[by_id] if ys else np.zeros(0, np.int64)
        p_val = np.concatenate(probs)[by_id] if probs else np.zeros((0, len(LABELS)), np.float32)
        pred = p_val.argmax(axis=1)
        val_waf, val_acc = weighted_f1(y_val, pred), accuracy(y_val, pred)
        val_loss = float(-np.log(np.clip(p_val[np.arange(len(y_val)), y_val], 1e-8, None)).mean()) if len(y_val) else 0.0

        # Rank 0 decides, everyone follows: gathering ZeRO-3 weights is collective and the workers must
        # leave the loop at the same epoch, so no rank may act on its own copy of the validation result.
        flag = torch.tensor([1.0 if val_waf > state["best_waf"] + 1e-9 else 0.0], device=device)
        torch.distributed.broadcast(flag, src=0)
        improved = bool(flag.item())
        if improved:
            best = _state_dict(engine)
            state["best_waf"], state["best_epoch"] = val_waf, epoch
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        state["finished"] = state["bad_epochs"] >= tc.patience or epoch >= tc.max_epochs
        seconds = time.time() - t0
        row = {"fold": fold, "epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "val_loss": val_loss,
               "val_waf": val_waf, "val_acc": val_acc, "best_val_waf": state["best_waf"],
               "samples_per_s": n_seen * world / max(train_seconds, 1e-9), "seconds": seconds,
               "attempt": len(state["resumed_from"]), **ran_with}
        state["history"].append(row)
        if state["finished"]:
            state["finished_at"] = time.time()
        states[key] = state

        with tempfile.TemporaryDirectory() as tmp:
            # Taken before _write_val_predictions (which draws initial weights): the next epoch starts here.
            (Path(tmp) / RNG_FILE.format(rank=rank)).write_text(json.dumps(rng_state()))
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                (Path(tmp) / "state.json").write_text(json.dumps({"fits": states, "startup": startup,
                                                                  **(header or {})}))
                own = Path(tmp) / fit_dir(key)
                own.mkdir()
                if best is not None:
                    torch.save(best, own / "best.pt")
                if state["finished"]:
                    _write_val_predictions(own / "val_pred.parquet", fit, tc, best, ids, y_val,
                                           np.concatenate(xs)[by_id] if xs else None,
                                           np.concatenate(masks)[by_id] if masks else None)
                    files.update({f"{fit_dir(key)}/{p.name}": p.read_bytes() for p in own.iterdir()})
                for rel, data in files.items():
                    if not (Path(tmp) / rel).exists():
                        (Path(tmp) / rel).parent.mkdir(exist_ok=True)
                        (Path(tmp) / rel).write_bytes(data)
            t_rep = time.time()
            # Which process trained the epoch, which fit it was and whether it was the fit's last: lets a Ray
            # Train callback tell the workers apart and follow a fit to its end (a study's per-epoch score over
            # folds).
            metrics = {**row, "pid": os.getpid(), "finished": state["finished"], "fit": key, "run": fit.get("run")}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            listened = on_report(metrics) if on_report is not None and rank == 0 else True
            print(f"[mer.train] fit {key} rank {rank} epoch {epoch}: train+val {seconds:.2f} s, "
                  f"checkpoint {t_rep - t0 - seconds:.2f} s, report {time.time() - t_rep:.2f} s", flush=True)
        if cancellable:
            # Rank 0 heard whether anyone still wants the fit; every rank leaves at the same epoch.
            gone = torch.tensor([0.0 if listened is not False else 1.0], device=device)
            torch.distributed.broadcast(gone, src=0)
            if gone.item() and not state["finished"]:
                state["cancelled"] = True
                break
        if state["finished"]:
            break
    if not Engines.reusable(tc) and hasattr(engine, "destroy"):
        engine.destroy()  # a per-fit engine: the next one starts clean (DeepSpeed keeps hooks and buffers otherwise)


def _write_val_predictions(path: Path, fit: dict, tc: Any, best: dict | None, ids: list[str],
                           y: np.ndarray, x: np.ndarray | None, mask: np.ndarray | None) -> None:
    """The best epoch's model on the validation rows: OOF probabilities and modality weights."""
    import torch  # lazy: torch and the fusion models load only where a model is built

    from mer.fusion import build_model

    mods = list(fit["dims"])
    model = build_model(fit["arch"], fit["dims"], tc)
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    n = len(ids)
    probs = np.zeros((n, len(LABELS)), np.float32)
    weights = np.zeros((n, len(mods)), np.float32)
    if n and x is not None and mask is not None:
        with torch.no_grad():
            logits, w = model(torch.from_numpy(x), torch.from_numpy(mask))
        probs, weights = torch.softmax(logits, dim=1).numpy(), w.numpy()
    cols: dict[str, Any] = {"clip_id": pa.array(ids, pa.string()), "y": pa.array(y, pa.int64())}
    for k, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(probs[:, k], pa.float32())
    for j, m in enumerate(mods):
        cols[f"weight_{m}"] = pa.array(weights[:, j], pa.float32())
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    path.write_bytes(buf.getvalue())
