"""Baselines behind the fusion interface: concatenation + MLP, and MER-baseline attention pooling."""

from __future__ import annotations

import torch
from torch import nn

from mer.fusion.base import FusionModel


class ConcatMLP(FusionModel):
    """Concatenate the projected modalities (zeros when missing) and the presence bits, then an MLP.

    It has no learned modality weights; it reports uniform weights over the present modalities.
    """

    arch = "concat_mlp"

    def __init__(self, dims: dict[str, int], **kw) -> None:
        super().__init__(dims, **kw)
        h, m = self.hidden_dim, len(self.modalities)
        self.head = nn.Sequential(nn.Linear(m * h + m, h), nn.GELU(), nn.Dropout(self.dropout_p),
                                  nn.Linear(h, self.num_classes))

    def fuse(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.project(x, mask)
        z = torch.cat([tokens.flatten(1), mask.to(tokens.dtype)], dim=1)
        w = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.head(z), w


class AttentionPool(FusionModel):
    """The MER challenge baseline's attention fusion: weights from an MLP over all projected modalities,
    softmax over (present) modalities, weighted sum, classifier."""

    arch = "attention_pool"

    def __init__(self, dims: dict[str, int], **kw) -> None:
        super().__init__(dims, **kw)
        h, m = self.hidden_dim, len(self.modalities)
        self.attention = nn.Sequential(nn.Linear(m * h, h), nn.GELU(), nn.Linear(h, m))
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(self.dropout_p),
                                  nn.Linear(h, self.num_classes))

    def fuse(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.project(x, mask)
        w = self.masked_softmax(self.attention(tokens.flatten(1)), mask)
        fused = (w.to(tokens.dtype).unsqueeze(-1) * tokens).sum(dim=1)
        return self.head(fused), w
