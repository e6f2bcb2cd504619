"""DSMIL (Li et al., CVPR 2021): instance classifier + critical-instance-based attention.

Per class c, the instance with the highest instance score is the critical instance; every
instance is weighted by the similarity of its query to the critical instance's query (softmax
over N), and the weighted values are classified per class. DSMIL trains with the mean of a bag
loss and a max-instance loss; behind the common `logits` interface we return the mean of the two
logits, `0.5 · (bag + max_n instance)`, which is also how its predictions are usually formed.
The attention map has one row per class: `[B, n_classes, N]`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from e2epath.models.layers import InstanceEmbedding, check_bag, masked_softmax


class DSMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, inner_dim: int = 256, dropout: float = 0.25,
                 query_dim: int = 128) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.embed = InstanceEmbedding(in_dim, inner_dim, dropout)
        self.instance_classifier = nn.Linear(inner_dim, n_classes, bias=False)
        self.query = nn.Sequential(OrderedDict(
            fc1=nn.Linear(inner_dim, query_dim, bias=False), act1=nn.ReLU(),
            fc2=nn.Linear(query_dim, query_dim, bias=False), act2=nn.Tanh(),
        ))
        self.value = nn.Sequential(OrderedDict(
            fc=nn.Linear(inner_dim, inner_dim, bias=False), act=nn.ReLU(),
        ))
        # One kernel spanning the whole value vector: a separate linear read-out per class
        # that may also mix classes (as in the original).
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=inner_dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False):
        x = check_bag(x, mask, self.in_dim, "DSMIL")
        h = self.embed(x)
        instance_logits = self.instance_classifier(h)  # B N C
        if mask is not None:
            instance_logits = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = instance_logits.max(dim=1)  # B C
        queries = self.query(h)  # B N Q
        critical_queries = torch.gather(queries, 1, critical.unsqueeze(-1).expand(-1, -1, queries.shape[-1]))
        scores = critical_queries @ queries.transpose(1, 2) * queries.shape[-1] ** -0.5  # B C N
        attention = masked_softmax(scores, mask)
        bag_features = attention.to(h.dtype) @ self.value(h)  # B C inner
        bag_logits = self.bag_classifier(bag_features).squeeze(-1)
        out = 0.5 * (bag_logits + max_logits)
        return (out, attention) if return_attention else out
