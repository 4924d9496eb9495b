"""Shared machinery of the branch encoders: model loading per actor, device/dtype, per-row status columns."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import numpy as np

from mer.config import MerConfig
from mer.models.registry import load_model, load_processor, pick_device, resolve_dtype
from mer.runtime.batches import isolate_rows, object_column

OK = "ok"
ERROR = "error"


def column(batch: dict[str, np.ndarray], name: str, n: int) -> list[Any]:
    """Rows of ``batch[name]`` as a list (all ``None`` when the column is absent)."""
    if name not in batch:
        return [None] * n
    return list(batch[name])


def is_missing(v: Any) -> bool:
    """None, NaN (pandas' null) or an empty array."""
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    if isinstance(v, np.ndarray) and v.size == 0:
        return True
    return False


def upstream_status(*values: Any, default: str) -> str:
    """The first non-``ok`` upstream status string, else ``default`` (used when an input is missing)."""
    for v in values:
        if isinstance(v, str) and v and v != OK:
            return v
    return default


class BranchEncoder:
    """Base of the ``map_batches`` callable classes: one model per actor, loaded in ``__init__``.

    Subclasses set ``branch``, ``input_columns``, ``output_columns`` and implement ``encode``, which returns
    the per-row outputs (:meth:`outputs` builds them from the encoded rows).
    """

    branch: ClassVar[str] = ""
    input_columns: ClassVar[tuple[str, ...]] = ()
    output_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MerConfig):
        self.cfg = cfg
        self.stage = getattr(cfg.extract.encoders, self.branch)
        self.keep_sequence = bool(self.stage.keep_sequence)
        self.enabled = bool(self.stage.enabled)
        self.device = pick_device(self.stage.resources.num_gpus)
        self.dtype = resolve_dtype(self.stage.resources.dtype, self.device)
        self.spec = getattr(cfg.models, self.branch)
        self.model = self.processor = None
        if self.enabled:
            self.model = load_model(self.spec, cfg, device=self.device, dtype=self.stage.resources.dtype)
            self.processor = load_processor(self.spec, cfg)
        # Items (frames / clips / texts) per forward: bounds activation memory whatever the batch size.
        self.chunk = 256 if self.device.startswith("cuda") else 64

    def _autocast(self):
        import torch

        if self.device.startswith("cuda") and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def encode(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        """Per-row outputs: ``{output column: list of n values}``."""
        raise NotImplementedError

    def _empty_outputs(self, n: int, status: str) -> dict[str, list[Any]]:
        outs: dict[str, list[Any]] = {}
        for name in self.output_columns:
            if not name.startswith(self.branch):
                continue
            if name.endswith("_status"):
                outs[name] = [status] * n
            else:
                outs[name] = [None] * n
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        if not self.enabled:
            outs = self._empty_outputs(n, "disabled")
        else:
            import torch

            with torch.inference_mode(), self._autocast():
                outs = self.encode(batch, n)
        result = dict(batch)
        for name, values in outs.items():
            if name.endswith("_seq") and not self.keep_sequence:
                continue
            result[name] = object_column(values)
        return result

    def _run_rows(self, rows: list[int], forward, on_error: dict[int, str]) -> dict[int, Any]:
        """``forward(rows)`` -> {row: result}, a failing row isolated (:func:`mer.runtime.batches.isolate_rows`)."""
        return isolate_rows(rows, forward, on_error, self.branch)

    @staticmethod
    def outputs(prefix: str, status: list[str], encoded: dict[int, np.ndarray], errors: dict[int, str]
                ) -> dict[str, list[Any]]:
        """A branch's per-row outputs: ``<prefix>`` (the mean over the row's frame/token/time states),
        ``<prefix>_seq`` (those states), ``<prefix>_status`` (``ok`` where encoded, ``error`` where the forward
        failed, else the status already in ``status``) and ``<prefix>_error``."""
        n = len(status)
        pooled: list[Any] = [None] * n
        seq: list[Any] = [None] * n
        status = list(status)
        for r, v in encoded.items():
            pooled[r] = v.mean(axis=0).astype(np.float32)
            seq[r] = v
            status[r] = OK
        for r in errors:
            status[r] = ERROR
        return {prefix: pooled, f"{prefix}_status": status, f"{prefix}_seq": seq,
                f"{prefix}_error": [errors.get(i) for i in range(n)]}


def to_f32(t) -> np.ndarray:
    """A torch tensor as a contiguous float32 numpy array."""
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)
