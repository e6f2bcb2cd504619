"""ABMIL (Ilse et al., ICML 2018): one attention head, plain (tanh) or gated (tanh ⊙ sigmoid).

The instance embedding is the E2E variant of appendix B.3 of the ABMILX paper (Tang et al.,
NeurIPS 2025, arXiv:2506.02408; docs/method.md), shared by all aggregators here:
LayerNorm → Linear without bias → GELU → Dropout (Ilse et al. used Linear → ReLU), and the
attention and classifier layers are bias-free too, so ABMIL and ABMILX differ only in pooling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from e2epath.models.layers import InstanceEmbedding, check_bag, masked_softmax


class TanhAttention(nn.Module):
    """a_i = wᵀ tanh(V h_i)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim, bias=False)
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.score(torch.tanh(self.fc(h))).squeeze(-1)


class GatedAttention(nn.Module):
    """a_i = wᵀ (tanh(V h_i) ⊙ sigmoid(U h_i))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim, bias=False)
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.score(torch.tanh(self.fc(h)) * torch.sigmoid(self.gate(h))).squeeze(-1)


class ABMIL(nn.Module):
    """Attention-based MIL. Logits `[B, n_classes]`; attention `[B, 1, N]`."""

    def __init__(self, in_dim: int, n_classes: int, inner_dim: int = 256, dropout: float = 0.25,
                 gated: bool = False, attention_dim: int = 128) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.embed = InstanceEmbedding(in_dim, inner_dim, dropout)
        attention = GatedAttention if gated else TanhAttention
        self.attention = attention(inner_dim, attention_dim)
        self.classifier = nn.Linear(inner_dim, n_classes, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False):
        x = check_bag(x, mask, self.in_dim, type(self).__name__)
        h = self.embed(x)
        attention = masked_softmax(self.attention(h), mask).unsqueeze(1)  # B 1 N
        z = torch.bmm(attention.to(h.dtype), h).squeeze(1)
        out = self.classifier(z)
        return (out, attention) if return_attention else out
