"""TransMIL-style self-attention MIL (Shao et al., NeurIPS 2021), simplified.

A CLS token is prepended to the embedded instances, two pre-norm multi-head self-attention layers
mix all tokens, and the CLS token is classified. Differences from the original, on purpose:

- exact softmax attention through `F.scaled_dot_product_attention` (fused, memory-efficient
  kernels) instead of the Nyström approximation;
- no PPEG positional module: it reshapes the bag into a square image in instance order, which is
  not the slide's geometry and makes the model depend on the order of the instances. Without it
  the model is permutation invariant like every other aggregator here.

The attention map returned is the last layer's CLS-token attention per head over the instances,
renormalised over the N instances (the CLS token's attention to itself is dropped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2epath.models.layers import InstanceEmbedding, check_bag


class SelfAttentionLayer(nn.Module):
    """x + proj(MHSA(LayerNorm(x))), bias-free projections."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"TransMIL: inner_dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, n, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, n, 3, self.n_heads, dim // self.n_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B H N d

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self._qkv(x)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return x + self.proj(out.transpose(1, 2).flatten(2))

    def cls_attention(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attention of token 0 (CLS) to tokens 1..N, per head, renormalised: `[B, H, N]`."""
        q, k, _ = self._qkv(x)
        scores = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).squeeze(2).float() * q.shape[-1] ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, 1:], float("-inf"))
        return scores.softmax(dim=-1)


class TransMIL(nn.Module):
    """CLS token + 2 self-attention layers. Logits `[B, n_classes]`; attention `[B, n_heads, N]`."""

    def __init__(self, in_dim: int, n_classes: int, inner_dim: int = 256, n_heads: int = 8,
                 n_layers: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.embed = InstanceEmbedding(in_dim, inner_dim, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, inner_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.layers = nn.ModuleList(SelfAttentionLayer(inner_dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(inner_dim)
        self.classifier = nn.Linear(inner_dim, n_classes, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False):
        x = check_bag(x, mask, self.in_dim, "TransMIL")
        h = self.embed(x)
        tokens = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        key_mask = None
        if mask is not None:
            key_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        for layer in self.layers[:-1]:
            tokens = layer(tokens, key_mask)
        last = self.layers[-1]
        attention = last.cls_attention(tokens, key_mask) if return_attention else None
        tokens = last(tokens, key_mask)
        out = self.classifier(self.norm(tokens[:, 0]))
        return (out, attention) if return_attention else out
