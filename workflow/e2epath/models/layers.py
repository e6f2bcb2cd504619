"""Pieces shared by every MIL aggregator: bag checks, the instance embedding, masked softmax.

A bag batch is `x: [B, N, D]` with an optional boolean `mask: [B, N]` (True = a real instance),
so bags of different sizes can be padded into one tensor. Padded instances are zeroed on entry
(so a NaN in padding cannot leak through `0 * NaN`) and get zero attention.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def check_bag(x: Tensor, mask: Tensor | None, in_dim: int, model: str) -> Tensor:
    """Validate shapes and return `x` with padded instances zeroed."""
    if x.dim() != 3 or x.shape[-1] != in_dim:
        raise ValueError(f"{model}: expected a bag batch [B, N, {in_dim}], got {tuple(x.shape)}; "
                         "add the batch dimension with x.unsqueeze(0) for a single bag")
    if x.shape[1] == 0:
        raise ValueError(f"{model}: empty bag (N = 0); a slide without patches cannot be scored")
    if mask is None:
        return x
    if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(f"{model}: mask must be bool [B, N] = {tuple(x.shape[:2])} (True = valid "
                         f"instance), got {mask.dtype} {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{model}: a bag in the batch has no valid instance (mask all False)")
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last (instance) axis of `[B, ..., N]`, in float32, padding excluded."""
    logits = logits.float()
    if mask is not None:
        shape = (mask.shape[0],) + (1,) * (logits.dim() - 2) + (mask.shape[1],)
        logits = logits.masked_fill(~mask.view(shape), float("-inf"))
    return logits.softmax(dim=-1)


class InstanceEmbedding(nn.Sequential):
    """LayerNorm (no bias) → Linear (no bias) → GELU → Dropout.

    The input LayerNorm and bias-free linear layer are the E2E choices of the ABMILX paper (appendix
    B.3 of Tang et al., NeurIPS 2025, arXiv:2506.02408; docs/method.md): they keep
    the fine-tuned encoder's feature scale from destabilising the aggregator. All aggregators
    share this embedding so a comparison between them isolates the pooling.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.25) -> None:
        super().__init__(OrderedDict(
            norm=nn.LayerNorm(in_dim, bias=False),
            fc=nn.Linear(in_dim, out_dim, bias=False),
            act=nn.GELU(),
            dropout=nn.Dropout(dropout),
        ))
