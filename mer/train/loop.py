"""The per-worker training loop (runs inside Ray Train workers): DeepSpeed engine, epochs, checkpoints.

Every epoch each worker saves its DeepSpeed shard (``engine.save_checkpoint``) and rank 0 adds
``state.json`` (epoch, best WAF, patience counter, history) and ``best.pt`` (plain state dict of the best
epoch so far); Ray Train merges the workers' files into one checkpoint directory in ``RunConfig.storage_path``.
A restarted worker group (``FailureConfig``) or a resumed run finds it via ``ray.train.get_checkpoint()``
and continues with the next epoch, optimizer state included. The final checkpoint also holds
``val_pred.parquet``: the best model's predictions on the fold's validation rows.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS

DS_TAG = "ds"


def deepspeed_config(tc: Any) -> dict[str, Any]:
    """DeepSpeed config from ``TrainConfig``: ZeRO stage, precision, accumulation, AdamW (torch impl)."""
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        # torch_adam: DeepSpeed's fused CPU/GPU Adam ops are not compiled in this environment.
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": tc.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": tc.precision == "bf16"},
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


def _batch_arrays(batch: pa.Table, mods: list[str], dims: dict[str, int]) -> tuple:
    from mer.train.features import table_inputs

    x, mask = table_inputs(batch, mods, dims)
    y = np.asarray(batch.column("y").to_numpy(zero_copy_only=False), dtype=np.int64)
    w = np.asarray(batch.column("w").to_numpy(zero_copy_only=False), dtype=np.float32)
    return x, mask, y, w


class ShardBatches:
    """Batches ``(clip_ids, x, mask, y, w)`` of one Ray Data shard.

    ``cache=False`` streams the shard from Ray Data every epoch (local shuffle buffer). ``cache=True``
    streams it once and keeps this worker's part in memory as arrays: pooled feature vectors are small,
    and re-running the streaming executor every epoch costs seconds of scheduling per epoch.
    """

    def __init__(self, it: Any, mods: list[str], dims: dict[str, int], batch_size: int, cache: bool,
                 shuffle: bool) -> None:
        self.it, self.mods, self.dims = it, mods, dims
        self.batch_size, self.cache, self.shuffle = batch_size, cache, shuffle
        self._arrays: tuple | None = None

    def _load(self) -> tuple:
        ids: list[str] = []
        parts = []
        for batch in self.it.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids += batch.column("clip_id").to_pylist()
            parts.append(_batch_arrays(batch, self.mods, self.dims))
        if not parts:
            total = sum(self.dims.values())
            return (ids, np.zeros((0, total), np.float32), np.zeros((0, len(self.mods)), bool),
                    np.zeros(0, np.int64), np.zeros(0, np.float32))
        return (ids, *(np.concatenate([p[i] for p in parts]) for i in range(4)))

    def epoch(self, seed: int):
        if not self.cache:
            kw = ({"local_shuffle_buffer_size": max(self.batch_size * 4, 64), "local_shuffle_seed": seed}
                  if self.shuffle else {})
            for batch in self.it.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", **kw):
                yield (batch.column("clip_id").to_pylist(), *_batch_arrays(batch, self.mods, self.dims))
            return
        if self._arrays is None:
            self._arrays = self._load()
        ids, x, mask, y, w = self._arrays
        order = np.random.default_rng(seed).permutation(len(y)) if self.shuffle else np.arange(len(y))
        for s in range(0, len(y), self.batch_size):
            idx = order[s:s + self.batch_size]
            yield [ids[i] for i in idx], x[idx], mask[idx], y[idx], w[idx]


def _weighted_ce(logits: Any, y: Any, w: Any, smoothing: float) -> Any:
    import torch.nn.functional as F

    per = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
    return (per * w).sum() / w.sum().clamp_min(1e-6)


def _maybe_fail(fault: dict | None, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process for real, once (a marker file remembers it happened)."""
    if not fault or epoch != int(fault["epoch"]) or rank != int(fault.get("rank", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    reached_at = time.time()
    # Give the controller time to register the previous epoch's checkpoint (it polls workers every ~2 s),
    # so the restart has a checkpoint to resume from, as it would after a crash later in a long epoch.
    time.sleep(float(fault.get("delay_s", 5.0)))
    marker.write_text(f"killed rank {rank} at epoch {epoch} pid {os.getpid()} reached_at {reached_at!r}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: train (TrainConfig dump), arch, dims, fold, input_stats
    (``[mean, std]`` or None), fault (test hook)."""
    import deepspeed
    import ray.train
    import torch

    from mer.config import TrainConfig
    from mer.fusion import build_model
    from mer.metrics import accuracy, weighted_f1

    t_start = time.time()
    tc = TrainConfig.model_validate(config["train"])
    fold = int(config["fold"])
    dims: dict[str, int] = {m: int(d) for m, d in config["dims"].items()}
    mods = list(dims)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(config.get("threads", 1)))
    torch.set_num_threads(threads)

    torch.manual_seed(tc.seed * 1000 + fold)  # same initial weights on every rank
    model = build_model(config["arch"], dims, tc)
    if config.get("input_stats"):
        model.set_input_stats(*config["input_stats"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=deepspeed_config(tc))
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    torch.manual_seed(tc.seed * 1000 + fold * 10 + rank + 1)  # modality dropout differs per rank

    state: dict[str, Any] = {"epoch": 0, "best_waf": -1.0, "best_epoch": 0, "bad_epochs": 0,
                             "finished": False, "history": [], "resumed_from": []}
    best: dict[str, Any] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True)
            state = json.loads((Path(d) / "state.json").read_text())
            best_path = Path(d) / "best.pt"
            if best_path.exists():
                best = torch.load(best_path, map_location="cpu", weights_only=True)
        state["resumed_from"].append(int(state["epoch"]))
    print(f"[mer.train] fold {fold} rank {rank}: engine ready in {time.time() - t_start:.1f} s", flush=True)
    if state["finished"]:
        return  # a finished fold's final checkpoint already holds everything

    shuffle_seed = tc.seed * 1000 + fold * 100
    train_src = ShardBatches(ray.train.get_dataset_shard("train"), mods, dims, tc.batch_size, tc.cache_shards,
                             shuffle=True)
    val_src = ShardBatches(ray.train.get_dataset_shard("val"), mods, dims, 256, tc.cache_shards, shuffle=False)
    fault = config.get("fault")

    def to_t(a: np.ndarray, dt: Any = None) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return t.to(dt) if dt is not None else t

    while state["epoch"] < tc.max_epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        engine.train()
        loss_sum, n_seen = 0.0, 0
        for step, (_, x, mask, y, w) in enumerate(train_src.epoch(shuffle_seed + epoch)):
            if step == 1:
                _maybe_fail(fault, epoch, rank)
            logits, _ = engine(to_t(x, dtype), to_t(mask))
            loss = _weighted_ce(logits, to_t(y), to_t(w), tc.label_smoothing)
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
        y_val = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        p_val = np.concatenate(probs) if probs else np.zeros((0, len(LABELS)), np.float32)
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
               "attempt": len(state["resumed_from"])}
        state["history"].append(row)

        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                (Path(tmp) / "state.json").write_text(json.dumps(state))
                if best is not None:
                    torch.save(best, Path(tmp) / "best.pt")
                if state["finished"]:
                    _write_val_predictions(Path(tmp) / "val_pred.parquet", config, tc, best, ids, y_val,
                                           np.concatenate(xs) if xs else None,
                                           np.concatenate(masks) if masks else None)
            t_rep = time.time()
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            print(f"[mer.train] fold {fold} rank {rank} epoch {epoch}: train+val {seconds:.2f} s, "
                  f"checkpoint {t_rep - t0 - seconds:.2f} s, report {time.time() - t_rep:.2f} s", flush=True)
        if state["finished"]:
            break


def _write_val_predictions(path: Path, config: dict, tc: Any, best: dict | None, ids: list[str],
                           y: np.ndarray, x: np.ndarray | None, mask: np.ndarray | None) -> None:
    """The best epoch's model on the validation rows: OOF probabilities and modality weights."""
    import torch

    from mer.fusion import build_model

    mods = list(config["dims"])
    model = build_model(config["arch"], config["dims"], tc)
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
    for k, lab in enumerate(LABELS):
        cols[f"prob_{lab}"] = pa.array(probs[:, k], pa.float32())
    for j, m in enumerate(mods):
        cols[f"weight_{m}"] = pa.array(weights[:, j], pa.float32())
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    path.write_bytes(buf.getvalue())
