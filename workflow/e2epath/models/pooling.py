"""Mean pooling: the simplest MIL baseline (every instance weighs 1 / N)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from e2epath.models.layers import InstanceEmbedding, check_bag


class MeanPooling(nn.Module):
    """Embed instances, average the valid ones, classify. Attention `[B, 1, N]` is uniform."""

    def __init__(self, in_dim: int, n_classes: int, inner_dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.embed = InstanceEmbedding(in_dim, inner_dim, dropout)
        self.classifier = nn.Linear(inner_dim, n_classes, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False):
        x = check_bag(x, mask, self.in_dim, "MeanPooling")
        weights = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        attention = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(1)  # B 1 N
        h = self.embed(x)
        out = self.classifier(torch.bmm(attention.to(h.dtype), h).squeeze(1))
        return (out, attention) if return_attention else out
