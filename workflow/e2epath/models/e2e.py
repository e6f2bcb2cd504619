"""The end-to-end model: a patch encoder applied to every instance of a bag, then a MIL aggregator
over each bag; built for training (`e2epath.train.e2e`) and rebuilt from model files
(`e2epath.train.modelfile`)."""
from __future__ import annotations

import torch
from torch import nn


class E2EModel(nn.Module):
    """Encoder applied to every instance, then the MIL aggregator over each bag."""

    def __init__(self, encoder: nn.Module, aggregator: nn.Module) -> None:
        super().__init__()
        self.encoder, self.aggregator = encoder, aggregator

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalised [n, 3, H, W] → [n, D]; channels_last feeds cuDNN's fast NHWC kernels on GPU."""
        layout = torch.channels_last if patches.is_cuda else torch.contiguous_format
        return self.encoder(patches.contiguous(memory_format=layout))

    def forward(self, bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """bags: [B, S, 3, H, W] normalised → logits [B, outputs]. ``mask`` [B, S] (True = a real
        patch) marks bags shorter than S: only real patches go through the encoder (BatchNorm never
        sees padding) and the aggregator ignores the rest."""
        b, s = bags.shape[:2]
        if mask is None:
            return self.aggregator(self.encode(bags.flatten(0, 1)).view(b, s, -1))
        real = self.encode(bags[mask])
        feats = real.new_zeros((b, s, real.shape[-1]))
        feats[mask] = real
        return self.aggregator(feats, mask=mask)
