"""Shared machinery of the branch encoders: model loading per actor, device/dtype, per-row status columns."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

import numpy as np

from mer.config import MerConfig

log = logging.getLogger(__name__)

OK = "ok"
ERROR = "error"


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-shape arrays otherwise)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


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

    Subclasses set ``branch``, ``input_columns``, ``output_columns`` and implement ``encode`` which returns
    per-row ``(pooled, seq, status)``.
    """

    branch: ClassVar[str] = ""
    input_columns: ClassVar[tuple[str, ...]] = ()
    output_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MerConfig):
        from mer.models.registry import load_model, load_processor, pick_device, resolve_dtype

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
        """``forward(rows)`` -> {row: result}; if the whole chunk fails, retry row by row so that one bad
        input only costs its own row (recorded in ``on_error``), never the batch."""
        try:
            return forward(rows)
        except Exception as e:  # noqa: BLE001 - isolate the failing row below
            if len(rows) == 1:
                on_error[rows[0]] = f"{self.branch}: {e.__class__.__name__}: {e}"
                log.warning("%s encoder failed on a row: %s", self.branch, e)
                return {}
            out: dict[int, Any] = {}
            for r in rows:
                out.update(self._run_rows([r], forward, on_error))
            return out


def to_f32(t) -> np.ndarray:
    """A torch tensor as a contiguous float32 numpy array."""
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)
