"""The MIL aggregators by name (`AGGREGATORS`, one entry per name of
`e2epath.core.vocabulary.AGGREGATORS`) and `build_aggregator`.

Every aggregator takes a bag batch `x: [B, N, in_dim]` and an optional boolean `mask: [B, N]`
(True = real instance; padding gets zero attention and cannot influence the others) and returns
logits `[B, n_classes]`, or `(logits, attention)` with `return_attention=True`, attention being
`[B, heads, N]` after softmax over N (heads = 1 for ABMIL / mean pooling, n_heads for ABMILX and
TransMIL, n_classes for DSMIL).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import nn

from e2epath.models.abmil import ABMIL
from e2epath.models.abmilx import ABMILX
from e2epath.models.dsmil import DSMIL
from e2epath.models.pooling import MeanPooling
from e2epath.models.transmil import TransMIL

AGGREGATORS: dict[str, Callable[..., nn.Module]] = {
    "abmilx": ABMILX,
    "abmil": partial(ABMIL, gated=False),
    "abmil_gated": partial(ABMIL, gated=True),
    "transmil": TransMIL,
    "dsmil": DSMIL,
    "mean": MeanPooling,
}


def build_aggregator(name: str, in_dim: int, n_classes: int, **kw: Any) -> nn.Module:
    """The MIL aggregator `name` (one of AGGREGATORS) with constructor keywords `kw`."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name](in_dim, n_classes, **kw)

