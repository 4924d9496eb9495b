"""ECMF fusion: self-attention across modality tokens → dynamic modality weights → weighted sum + residual.

With ``reliability=True`` (every model built now; specs written before it rebuild without) three additions make
the weights track how much each modality can be trusted (docs/architecture.md, "Fusion reliability"):

- an auxiliary unimodal classifier on each modality's projected token, trained with its own cross entropy
  (``aux_loss_weight``; :meth:`FusionModel.loss`) so each token must carry the label by itself — the unimodal
  experts of MER2025 #2 and the unimodal/multimodal agreement of MER2023 NWPU, inside one network;
- the gate adds a learned function of each unimodal head's confidence (its maximum probability and
  1 - normalised entropy, gradients stopped) to its score, so a modality whose head cannot tell the classes
  apart is weighed down (confidence-aware dynamic fusion: Han et al., "Multimodal Dynamics", CVPR 2022;
  Zhang et al., "Provable Dynamic Fusion for Low-Quality Multimodal Data", ICML 2023);
- the residual of the projected representations is weighted by the same modality weights (not their plain
  mean), so that a modality the gate discounts is discounted on both paths;
- with ``slots`` (default) the head reads one slot per modality, its weighted attended token plus its own
  projection, concatenated: the residual keeps each original representation apart instead of summing them all
  into one hidden-size vector (ECMF's "residual connections that keep each original representation").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mer.fusion.base import FusionModel


class ECMF(FusionModel):
    """Projected modality tokens (+ learned modality embeddings) attend to each other (missing ones masked
    out as keys); a gate over the attended tokens (and, with ``reliability``, the unimodal heads' confidence)
    gives each clip its own modality weights; the fused vector is the weighted sum of attended tokens plus a
    residual of the original projected representations, so the attention can refine but never erase a
    modality (the residual is the masked mean without ``reliability``, the weighted sum with it)."""

    arch = "ecmf"

    def __init__(self, dims: dict[str, int], reliability: bool = True, slots: bool = True, **kw) -> None:
        super().__init__(dims, **kw)
        h = self.hidden_dim
        if h % self.num_heads:
            raise ValueError(f"hidden_dim {h} must be divisible by num_heads {self.num_heads}")
        self.reliability = bool(reliability)
        self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), h) * 0.02)
        layer = nn.TransformerEncoderLayer(h, self.num_heads, dim_feedforward=2 * h, dropout=self.dropout_p,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.num_layers, enable_nested_tensor=False)
        self.gate = nn.Sequential(nn.Linear(h, h // 2), nn.Tanh(), nn.Linear(h // 2, 1))
        # ``slots``: the head reads one slot per modality (its weighted attended token plus its own projection)
        # instead of their sum, so the residual keeps each original representation apart (a sum of tokens is
        # one hidden-size vector for every modality together: it lost to a plain concatenation MLP whenever
        # every modality carried the label, `mer bench fusion` all_weak). Specs written before have no slots.
        self.slots = bool(reliability and slots)
        width = h * len(self.modalities) if self.slots else h
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout_p),
                                  nn.Linear(h, self.num_classes))
        if self.reliability:
            self.aux = nn.ModuleDict({m: nn.Linear(h, self.num_classes) for m in self.modalities})
            # Confidence features → gate score, per modality (its own scale: a 768-d and a 32-d head's
            # confidences are not on the same footing).
            self.confidence_gate = nn.Parameter(torch.zeros(len(self.modalities), 2))
            self.confidence_bias = nn.Parameter(torch.zeros(len(self.modalities)))

    def spec(self) -> dict:
        return {**super().spec(), "reliability": self.reliability, "slots": self.slots}

    def confidence(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """``[B, M, 2]``: each unimodal head's maximum probability and 1 - normalised entropy (no gradient)."""
        p = torch.softmax(aux_logits.detach().float(), dim=-1)
        entropy = -(p * p.clamp_min(1e-8).log()).sum(-1) / math.log(p.shape[-1])
        return torch.stack([p.max(-1).values, 1.0 - entropy], dim=-1)

    def fuse(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.project(x, mask)
        tokens = projected + self.modality_embedding.to(projected.dtype)
        any_present = mask.any(dim=1, keepdim=True)
        # A row with every key masked would give NaN attention; let it attend (to zeros) and drop it below.
        padding = ~(mask | ~any_present)
        attended = self.encoder(tokens, src_key_padding_mask=padding)
        scores = self.gate(attended).squeeze(-1)
        if not self.reliability:
            self.aux_out = None
            weights = self.masked_softmax(scores, mask)
            fused = (weights.to(attended.dtype).unsqueeze(-1) * attended).sum(dim=1)
            fused = fused + self.masked_mean(projected, mask)
            return self.head(self.norm(fused)), weights
        aux_logits = torch.stack([self.aux[m](projected[:, j]) for j, m in enumerate(self.modalities)], dim=1)
        self.aux_out = (aux_logits, mask)
        conf = self.confidence(aux_logits)
        scores = scores.float() + (conf * self.confidence_gate).sum(-1) + self.confidence_bias
        weights = self.masked_softmax(scores, mask)
        wt = weights.to(attended.dtype).unsqueeze(-1)
        if self.slots:
            # x M: uniform weights leave each slot at the scale of its token; a missing modality's slot is 0.
            fused = (wt * len(self.modalities) * (attended + projected)).flatten(1)
        else:
            fused = (wt * attended).sum(dim=1) + (wt * projected).sum(dim=1)
        return self.head(self.norm(fused)), weights
