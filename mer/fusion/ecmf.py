"""ECMF fusion: self-attention across modality tokens → dynamic modality weights → weighted sum + residual."""

from __future__ import annotations

import torch
from torch import nn

from mer.fusion.base import FusionModel


class ECMF(FusionModel):
    """Projected modality tokens (+ learned modality embeddings) attend to each other (missing ones masked
    out as keys); a gate over the attended tokens gives each clip its own modality weights; the fused
    vector is the weighted sum of attended tokens plus a residual of the original projected
    representations (their masked mean), so the attention can refine but never erase a modality."""

    arch = "ecmf"

    def __init__(self, dims: dict[str, int], **kw) -> None:
        super().__init__(dims, **kw)
        h = self.hidden_dim
        if h % self.num_heads:
            raise ValueError(f"hidden_dim {h} must be divisible by num_heads {self.num_heads}")
        self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), h) * 0.02)
        layer = nn.TransformerEncoderLayer(h, self.num_heads, dim_feedforward=2 * h, dropout=self.dropout_p,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.num_layers, enable_nested_tensor=False)
        self.gate = nn.Sequential(nn.Linear(h, h // 2), nn.Tanh(), nn.Linear(h // 2, 1))
        self.norm = nn.LayerNorm(h)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(self.dropout_p),
                                  nn.Linear(h, self.num_classes))

    def fuse(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.project(x, mask)
        tokens = projected + self.modality_embedding.to(projected.dtype)
        any_present = mask.any(dim=1, keepdim=True)
        # A row with every key masked would give NaN attention; let it attend (to zeros) and drop it below.
        padding = ~(mask | ~any_present)
        attended = self.encoder(tokens, src_key_padding_mask=padding)
        weights = self.masked_softmax(self.gate(attended).squeeze(-1), mask)
        fused = (weights.to(attended.dtype).unsqueeze(-1) * attended).sum(dim=1)
        fused = fused + self.masked_mean(projected, mask)
        return self.head(self.norm(fused)), weights
