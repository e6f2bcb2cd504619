"""ABMILX: multi-head local attention + global attention plus (section 3.2, eq. 3-4 of the paper:
W. Tang, R. Qin, H. Fang, F. Zhou, H. Chen, X. Li, M.-M. Cheng, "Revisiting End-to-End Learning
with Slide-level Supervision in Computational Pathology", NeurIPS 2025, arXiv:2506.02408; docs/method.md).

For a bag E (N × D):

1. H = Dropout(GELU(Linear_noBias(LayerNorm_noBias(E))))               N × inner
2. H is split channel-wise into m heads H^j (N × d_h, d_h = inner / m).
3. Local attention logits A^j = MLP(H^j), one MLP shared by all heads.
4. Attention plus: Q^j, K^j from Linear_noBias(LayerNorm(H^j)) (shared by heads),
   A^j ← A^j + softmax(Q^j K^jᵀ / √d_h) (α A^j), α one learnable scalar.
5. Z^j = softmax_N(A^j)ᵀ H^j, Z = concat_j Z^j → Linear_noBias → (FFN) → LayerNorm → classifier.

Step 4 is exact but never holds an N × N matrix: bags reach 10^4-10^5 instances at inference and
a plain `scaled_dot_product_attention` call with a one-wide value falls back to the math kernel
(N = 10^5 would ask for 320 GB). See `propagate_attention`.

Where the public implementation (DearCaat/E2E-WSI-ABMILX, `DAttentionX`) and the text differ we
follow the code: no bias in the instance embedding, projection and classifier (B.3); the local
attention MLP bias-free unless `attn_bias` (the authors' survival config sets it); the FFN with
biases (`ffn_bias`, as their `Mlp`) before the final LayerNorm; xavier-normal init of linear
weights, zero biases. One deliberate departure: the
public code realises α as a 1 × 1 linear layer with xavier-normal init, i.e. α ~ N(0, 1), which
can start negative (propagation *against* similarity). We initialise α = `alpha_init` (0.5), half
way between the paper's ablation points α = 0 (MHLA only) and α = 1, and let it learn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2epath.models.layers import InstanceEmbedding, check_bag, masked_softmax

# Upper bound on what one query chunk may cost if SDPA falls back to its math kernel
# (B · heads · chunk · N float32 scores). The fused CPU/CUDA kernels need far less.
CHUNK_BUDGET_BYTES = 512 * 2**20


def propagate_attention(q: Tensor, k: Tensor, value: Tensor, mask: Tensor | None = None,
                        chunk_size: int = 2048) -> Tensor:
    """Exact `softmax(q kᵀ / √d) value` for a one-wide value, without an N × N matrix.

    q, k: `[B, H, N, d]`; value: `[B, H, N]`; mask: `[B, N]` bool (False keys are ignored).
    Softmax is row-wise, so splitting the queries into chunks is exact. The value is zero-padded
    to the head width because the fused SDPA kernels (flash on CPU, flash / memory-efficient on
    CUDA) need equal q/k/v widths; a one-wide value silently selects the math kernel, which
    materialises the scores (bench/abmilx.py, N = 10^4, 2 CPU threads: 5-10× slower and +7 GB).
    """
    batch, heads, n, d = q.shape
    padded = F.pad(value.unsqueeze(-1).to(q.dtype), (0, d - 1))
    attn_mask = None if mask is None else mask[:, None, None, :]
    bytes_per_query = batch * heads * n * 4
    step = max(1, min(chunk_size, CHUNK_BUDGET_BYTES // bytes_per_query))
    chunks = [F.scaled_dot_product_attention(q[:, :, s:s + step], k, padded, attn_mask=attn_mask)
              for s in range(0, n, step)]
    return torch.cat(chunks, dim=2)[..., 0]


class LocalAttention(nn.Module):
    """Attention logits of each head from its own channels: Linear → GELU → Linear(·, 1).

    One MLP shared by all heads (paper: "input into a shared MLP"); biases only with ``bias``
    (the public code's `abx_attn_bias`).
    """

    def __init__(self, head_dim: int, hidden_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        hidden_dim = hidden_dim or head_dim
        self.fc1 = nn.Linear(head_dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, 1, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        """h: `[B, H, N, d_h]` → logits `[B, H, N]`."""
        return self.fc2(self.act(self.fc1(h))).squeeze(-1)


class AttentionPlus(nn.Module):
    """Global attention plus (eq. 4): A ← A + softmax(Q Kᵀ / √d_h)(α A), shared by all heads."""

    def __init__(self, head_dim: int, alpha_init: float = 0.5, chunk_size: int = 2048) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(head_dim)
        self.qk = nn.Linear(head_dim, 2 * head_dim, bias=False)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.chunk_size = chunk_size

    def forward(self, h: Tensor, logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """h: `[B, H, N, d_h]`, logits: `[B, H, N]` → refined logits `[B, H, N]`."""
        q, k = self.qk(self.norm(h)).chunk(2, dim=-1)
        propagated = propagate_attention(q, k, self.alpha * logits, mask, self.chunk_size)
        return logits + propagated.to(logits.dtype)


class FeedForward(nn.Module):
    """x + MLP(x) on the slide feature (paper C.4 uses it for grading); with biases by default,
    as the public code's `Mlp`."""

    def __init__(self, dim: int, expansion: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * expansion, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class ABMILX(nn.Module):
    """ABMILX aggregator. `forward(x [B, N, in_dim], mask=None, return_attention=False)`.

    Returns logits `[B, n_classes]`, and with `return_attention=True` also the per-head attention
    `[B, n_heads, N]` (softmax over N; zero on padded instances).
    """

    def __init__(self, in_dim: int, n_classes: int, inner_dim: int = 256, n_heads: int = 8,
                 dropout: float = 0.25, attn_plus: bool = True, ffn: bool = False, ffn_bias: bool = True,
                 attn_bias: bool = False, alpha_init: float = 0.5, chunk_size: int = 2048) -> None:
        super().__init__()
        if inner_dim % n_heads:
            raise ValueError(f"ABMILX: inner_dim {inner_dim} is not divisible by n_heads {n_heads}")
        self.in_dim = in_dim
        self.n_heads = n_heads
        self.head_dim = inner_dim // n_heads
        self.embed = InstanceEmbedding(in_dim, inner_dim, dropout)
        self.attention = LocalAttention(self.head_dim, bias=attn_bias)
        self.attention_plus = AttentionPlus(self.head_dim, alpha_init, chunk_size) if attn_plus else None
        self.proj = nn.Linear(inner_dim, inner_dim, bias=False)
        self.ffn = FeedForward(inner_dim, bias=ffn_bias) if ffn else None
        self.norm = nn.LayerNorm(inner_dim, bias=False)
        self.classifier = nn.Linear(inner_dim, n_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal linear weights and zero biases, as the public implementation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False):
        x = check_bag(x, mask, self.in_dim, "ABMILX")
        h = self.embed(x)
        batch, n, inner = h.shape
        h = h.view(batch, n, self.n_heads, self.head_dim).transpose(1, 2)  # B H N d_h
        logits = self.attention(h)
        if self.attention_plus is not None:
            logits = self.attention_plus(h, logits, mask)
        attention = masked_softmax(logits, mask)
        z = torch.einsum("bhn,bhnd->bhd", attention.to(h.dtype), h).reshape(batch, inner)
        z = self.proj(z)
        if self.ffn is not None:
            z = self.ffn(z)
        out = self.classifier(self.norm(z))
        return (out, attention) if return_attention else out

