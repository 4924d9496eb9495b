"""A worker's DeepSpeed engine handed from fit to fit (mer.train.worker.Engines): a fit's result must not depend
on which fit ran before it on the same worker.

DeepSpeed initialises torch.distributed (gloo, one process) on first use; that is done in a child process so the
test session's own process stays free of a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json
import numpy as np
import torch
import torch.nn.functional as F

from mer.config import TrainConfig
from mer.fusion import build_model
from mer.train.worker import Engines

dims = {"audio": 6, "text": 5}
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.normal(size=(48, 11)).astype(np.float32))
mask = torch.from_numpy(rng.random((48, 2)) > 0.2)
y = torch.from_numpy(rng.integers(0, 6, size=48))


def fit(engines, tc, fold, steps=12):
    torch.manual_seed(fold)
    model = build_model("ecmf", dims, tc)
    model.set_input_stats([0.1 * fold] * 11, [1.0 + fold] * 11)
    engine = engines.get("ecmf", dims, tc, model)
    torch.manual_seed(100 + fold)
    engine.train()
    for s in range(steps):
        b = slice((s * 8) % 48, (s * 8) % 48 + 8)
        logits, _ = engine(x[b], mask[b])
        loss = F.cross_entropy(logits, y[b])
        engine.backward(loss)
        engine.step()
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


out = {}
for stage in (0, 2):
    tc = TrainConfig.model_validate({"hidden_dim": 16, "num_heads": 2, "zero_stage": stage, "lr": 0.01,
                                     "resources": {"batch_size": 8, "concurrency": 1, "num_cpus": 1.0,
                                                   "num_gpus": 0.0}})
    shared = Engines()
    a = fit(shared, tc, fold=0, steps=20)      # another fit first, longer, other weights and statistics
    b_after_a = fit(shared, tc, fold=1)
    fresh = Engines()
    b_alone = fit(fresh, tc, fold=1)
    out[stage] = {"same": all(torch.equal(b_after_a[k], b_alone[k]) for k in b_alone),
                  "differs_from_a": any(not torch.equal(a[k], b_alone[k]) for k in b_alone),
                  "built_shared": shared.built, "built_fresh": fresh.built, "keys": len(b_alone)}
import deepspeed.comm.comm as ds_comm

# DeepSpeed's CPU shared-memory op (inference only) was neither built nor loaded by the engines' comm backend.
out["shm_op"] = ds_comm.cdb.shm_comm_op is not None
print(json.dumps(out))
"""


def test_a_fit_on_a_reused_engine_equals_the_fit_on_a_fresh_one() -> None:
    """ZeRO-0 and ZeRO-2 (the default), in one child process (one DeepSpeed process group for both)."""
    # Port 0: the one-process group's store binds a port the OS picks (a port picked here and released could be
    # taken by another process before the child binds it).
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.pop("shm_op") is False  # no JIT compile of DeepSpeed's inference-only CPU op on a fresh machine
    assert sorted(result) == ["0", "2"]
    for stage, got in result.items():
        assert got["built_shared"] == 1, (stage, got)  # the second fit really was handed the first fit's engine
        assert got["built_fresh"] == 1 and got["keys"] > 10
        assert got["differs_from_a"], (stage, got)  # the fits are different fits
        # Bit for bit: weights, buffers (input statistics) and optimizer state were reset.
        assert got["same"], (stage, got)
