"""Fusion models: ECMF and two baselines behind one interface (see :mod:`mer.fusion.base`)."""

from __future__ import annotations

from typing import Any

from mer.fusion.base import FusionModel
from mer.fusion.baselines import AttentionPool, ConcatMLP
from mer.fusion.ecmf import ECMF

MODELS: dict[str, type[FusionModel]] = {"ecmf": ECMF, "concat_mlp": ConcatMLP, "attention_pool": AttentionPool}


def build_model(name: str, dims: dict[str, int], cfg: Any = None) -> FusionModel:
    """Build a fusion model by name for modalities ``dims`` (name → vector size, in input order).

    ``cfg`` is a ``TrainConfig`` (or a whole ``MerConfig``) for the hidden sizes; None uses defaults.
    """
    if name not in MODELS:
        raise ValueError(f"unknown fusion model {name!r}; choose from {sorted(MODELS)}")
    tc = getattr(cfg, "train", cfg)
    kw: dict[str, Any] = {}
    if tc is not None:
        kw = {"hidden_dim": tc.hidden_dim, "num_heads": tc.num_heads, "num_layers": tc.num_layers,
              "dropout": tc.dropout, "modality_dropout": tc.modality_dropout,
              "aux_loss_weight": tc.aux_loss_weight}
    return MODELS[name](dims, **kw)


def model_from_spec(spec: dict[str, Any]) -> FusionModel:
    """Rebuild a model from :meth:`FusionModel.spec` (``models/model.json``) — weights not loaded."""
    kw = {k: spec[k] for k in ("hidden_dim", "num_heads", "num_layers", "modality_dropout", "num_classes",
                               "aux_loss_weight") if k in spec}
    if spec["arch"] == "ecmf":
        # Specs written before the reliability additions have no such key: rebuild the model they trained.
        kw["reliability"] = bool(spec.get("reliability", False))
        kw["slots"] = bool(spec.get("slots", False))
    if "dropout" in spec:
        kw["dropout"] = spec["dropout"]
    dims = {m: int(spec["dims"][m]) for m in spec["modalities"]}
    return MODELS[spec["arch"]](dims, **kw)


__all__ = ["MODELS", "FusionModel", "ECMF", "ConcatMLP", "AttentionPool", "build_model", "model_from_spec"]
