"""What every fusion model shares: per-modality projections, the input layout, modality dropout.

Input layout (the contract with training and scoring): ``x`` is the concatenation of the modality vectors in
``modalities`` order, ``[B, sum(dims)]``, zeros where a modality is missing; ``mask`` is ``[B, M]`` bool,
True where the modality is present. Each vector is standardised inside the model (``in_mean``/``in_scale``
buffers, set from the training rows by :meth:`FusionModel.set_input_stats` and saved with the weights, so
scoring applies the same statistics). ``forward`` returns ``(logits [B, 6], weights [B, M])``; weights are 0 for
missing modalities and sum to 1 over the present ones (all 0 for a row with nothing present).

Training computes its loss with :meth:`FusionModel.loss` on the logits of the last ``forward``: the weighted cross
entropy, plus whatever auxiliary terms the model adds (ECMF's unimodal heads), so every trainer (the Ray Train
worker, the in-process :mod:`mer.train.local`) optimises the same objective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mer.config import LABELS


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross entropy per row, weighted by ``w`` and normalised by its sum."""
    per = nn.functional.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
    return (per * w).sum() / w.sum().clamp_min(1e-6)


class Projection(nn.Module):
    """Linear → LayerNorm → GELU → dropout: one modality's vector into the shared hidden space."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionModel(nn.Module):
    """Base class: holds the modality order, the projections and the modality-dropout rule."""

    arch = "base"

    def __init__(self, dims: dict[str, int], hidden_dim: int = 128, num_heads: int = 4, num_layers: int = 1,
                 dropout: float = 0.2, modality_dropout: float = 0.0, num_classes: int = len(LABELS),
                 aux_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.aux_loss_weight = float(aux_loss_weight)
        # (aux logits [B, M, C], mask the forward used [B, M]) of the last forward, for loss(); None for models
        # without auxiliary heads.
        self.aux_out: tuple[torch.Tensor, torch.Tensor] | None = None
        if not dims:
            raise ValueError("fusion model needs at least one modality")
        self.modalities = list(dims)
        self.dims = {m: int(d) for m, d in dims.items()}
        self.hidden_dim, self.num_heads, self.num_layers = hidden_dim, num_heads, num_layers
        self.dropout_p, self.modality_dropout = dropout, modality_dropout
        self.num_classes = num_classes
        self.proj = nn.ModuleDict({m: Projection(d, hidden_dim, dropout) for m, d in self.dims.items()})
        total = sum(self.dims.values())
        # Identity until set: pretrained encoders' pooled vectors often share a large offset per dimension
        # that swamps the emotion signal in a small head; standardising removes it.
        self.register_buffer("in_mean", torch.zeros(total))
        self.register_buffer("in_scale", torch.ones(total))

    def set_input_stats(self, mean: Any, std: Any) -> None:
        """Standardise inputs with per-dimension ``mean``/``std`` (modality order, ``sum(dims)`` values each);
        a dimension with ~zero spread is only centred."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.in_mean.numel() or std_t.numel() != self.in_mean.numel():
            raise ValueError(f"input stats have {mean_t.numel()}/{std_t.numel()} values, model inputs "
                             f"{self.in_mean.numel()}")
        self.in_mean.copy_(mean_t)
        self.in_scale.copy_(torch.where(std_t > 1e-6, 1.0 / std_t.clamp_min(1e-6), torch.ones_like(std_t)))

    # -- helpers -------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (stored as ``models/model.json``)."""
        return {"arch": self.arch, "dims": self.dims, "modalities": self.modalities,
                "hidden_dim": self.hidden_dim, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "dropout": self.dropout_p, "modality_dropout": self.modality_dropout,
                "num_classes": self.num_classes, "aux_loss_weight": self.aux_loss_weight, "labels": list(LABELS)}

    def project(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Projected modality tokens ``[B, M, H]``, zeroed where the modality is missing."""
        x = (x - self.in_mean.to(x.dtype)) * self.in_scale.to(x.dtype)
        parts = torch.split(x, [self.dims[m] for m in self.modalities], dim=1)
        tokens = torch.stack([self.proj[m](p) for m, p in zip(self.modalities, parts)], dim=1)
        return tokens * mask.unsqueeze(-1).to(tokens.dtype)

    def drop_modalities(self, mask: torch.Tensor) -> torch.Tensor:
        """Training-time modality dropout: hide present modalities at random, never all of a row's."""
        if not self.training or self.modality_dropout <= 0 or mask.shape[1] < 2:
            return mask
        keep = torch.rand(mask.shape, device=mask.device) >= self.modality_dropout
        dropped = mask & keep
        emptied = mask.any(dim=1) & ~dropped.any(dim=1)
        if emptied.any():
            # Give an emptied row back one of its present modalities, chosen at random.
            scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
            pick = nn.functional.one_hot(scores.argmax(dim=1), mask.shape[1]).bool()
            dropped = dropped | (pick & emptied.unsqueeze(1))
        return dropped

    @staticmethod
    def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax over present modalities; 0 for missing ones and for rows with nothing present."""
        any_present = mask.any(dim=1, keepdim=True)
        safe = mask | ~any_present  # a row with nothing present softmaxes over zeros, then is zeroed
        scores = scores.float().masked_fill(~safe, float("-inf"))
        w = torch.softmax(scores, dim=1)
        return w * mask.to(w.dtype)

    @staticmethod
    def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    # -- interface -----------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """The training objective for ``logits`` of the last :meth:`forward`: cross entropy weighted per row by
        ``w`` (label weights of refined or pseudo labels), plus ``aux_loss_weight`` x the same cross entropy of
        each auxiliary unimodal head on the rows where its modality was present (models with such heads)."""
        main = weighted_ce(logits, y, w, smoothing)
        if self.aux_out is None or self.aux_loss_weight <= 0:
            return main
        aux_logits, mask = self.aux_out
        b, m, c = aux_logits.shape
        per = nn.functional.cross_entropy(aux_logits.float().reshape(b * m, c), y.repeat_interleave(m),
                                          reduction="none", label_smoothing=smoothing).reshape(b, m)
        rw = w.float().unsqueeze(1) * mask.float()
        return main + self.aux_loss_weight * (per * rw).sum() / rw.sum().clamp_min(1e-6)

    def fuse(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], modality weights [B, M])`` for inputs in the layout described above."""
        mask = self.drop_modalities(mask.bool())
        return self.fuse(x, mask)

    @torch.no_grad()
    def export_weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The learned dynamic modality weights ``[B, M]`` per clip (eval mode, no modality dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(x, mask)[1].float()
        finally:
            self.train(was_training)
