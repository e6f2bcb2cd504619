"""Patch encoders: the architectures of the presets of `e2epath.models.presets`, built without
weights (`make_encoder`; which weights they get is `e2epath.models.weights`, how a checkpoint file
is loaded `e2epath.models.checkpoints`).

- ResNets: torchvision ResNet-18/50 cut after `layer3`, global average pooled. The paper (W. Tang et
  al., "Revisiting End-to-End Learning with Slide-level Supervision in Computational Pathology",
  NeurIPS 2025, arXiv:2506.02408; appendix B.3) removes the last ResNet stage to match the classic
  two-stage features: ResNet-18 gives 256-d, ResNet-50 1024-d. Parameter names are torchvision's
  (`conv1`, `bn1`, `layer1`..`layer3`), so a torchvision state dict loads after dropping
  `layer4.*` and `fc.*`.
- `timm:<name>`: a timm model built with the preset's kwargs (`num_classes: 0`), its embedding the
  model's pooled output or class token + mean patch token (`TimmEncoder`); `ctranspath`: timm's
  Swin-T with CTransPath's convolutional stem (`ConvStem`).

Every encoder offers ``out_dim``, ``spec`` (its preset), ``trainable_blocks`` (freeze all but the
last k blocks) and gradient checkpointing.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from e2epath.models.presets import EncoderError, encoder_spec

logger = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet50")  # the torchvision architectures a preset's arch may name


class Encoder(nn.Module):
    """What every encoder offers: ``out_dim``, ``spec`` (its preset dict), the blocks that
    ``trainable_blocks`` counts, and gradient checkpointing. Frozen parts stay in eval mode (their
    BatchNorm statistics do not move) when the model trains."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.out_dim = int(spec["dim"])
        self.grad_checkpointing = False
        self._frozen: list[nn.Module] = []

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def tail(self) -> list[nn.Module]:
        """Modules after the last block (they train whenever any block trains)."""
        return []

    def set_trainable_blocks(self, k: int | None) -> None:
        """Freeze everything but the last ``k`` blocks and what follows them (None: all train)."""
        if k is None:
            return
        blocks = self.blocks()
        if not 0 <= k <= len(blocks):
            raise EncoderError(f"encoder {self.spec['name']}: trainable_blocks {k} is not between 0 and its "
                               f"{len(blocks)} blocks")
        self.requires_grad_(False)
        live = blocks[len(blocks) - k:] + (self.tail() if k else [])
        for module in live:
            module.requires_grad_(True)
        live_ids = {id(p) for m in live for p in m.parameters()}
        self._frozen = [m for m in self.modules() if any(True for _ in m.parameters(recurse=False))
                        and not any(id(p) in live_ids for p in m.parameters(recurse=False))]
        logger.info("encoder %s: the last %d of %d blocks train, the rest is frozen", self.spec["name"], k,
                    len(blocks))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


class ResNetTrunk(Encoder):
    """conv1 … layer3 of a torchvision ResNet + global average pooling.

    `[B, 3, H, W]` → `[B, out_dim]`.
    """

    def __init__(self, arch: str, spec: dict[str, Any] | None = None) -> None:
        super().__init__(spec or encoder_spec(arch))
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def blocks(self) -> list[nn.Module]:
        return [*self.layer1, *self.layer2, *self.layer3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return torch.flatten(self.pool(x), 1)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3×3 convolutions (BatchNorm, ReLU) and a 1×1
    projection to the embedding width, then LayerNorm; NHWC out, as timm's Swin expects."""

    def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Any = None, **_: Any) -> None:
        super().__init__()
        if embed_dim % 8:
            raise EncoderError(f"ConvStem: embed_dim {embed_dim} is not a multiple of 8")
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(width_in, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        size = img_size if isinstance(img_size, int) else img_size[0]
        self.img_size, self.patch_size = (size, size), (4, 4)
        self.grid_size = (size // 4, size // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _layer_class(name: str) -> Any:
    import timm.layers

    return {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SwiGLU": timm.layers.SwiGLU, "SiLU": nn.SiLU,
            "GELU": nn.GELU}[name]


class TimmEncoder(Encoder):
    """A timm model (``num_classes: 0``); embedding: its pooled output (class token or average
    pool), or the class token and the mean of the patch tokens side by side (``cls+mean``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import timm

        kwargs = {k: _layer_class(v) if k in ("mlp_layer", "act_layer", "norm_layer") else v
                  for k, v in spec["kwargs"].items()}
        if spec["arch"] == "ctranspath":
            self.model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem,
                                           **kwargs)
        else:
            self.model = timm.create_model(spec["arch"].removeprefix("timm:"), pretrained=False, **kwargs)
        width = self.model.num_features * (2 if spec["embedding"] == "cls+mean" else 1)
        if width != self.out_dim:
            raise EncoderError(f"encoder {spec['name']}: {spec['arch']} with these kwargs gives {width}-d embeddings, "
                               f"the preset says dim {self.out_dim}; fix dim or kwargs")

    def blocks(self) -> list[nn.Module]:
        return list(getattr(self.model, self.spec["blocks"]))

    def tail(self) -> list[nn.Module]:
        return [m for n, m in self.model.named_children() if n in ("norm", "fc_norm", "head")]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec["embedding"] != "cls+mean":
            return self.model(x)
        tokens = self.model.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.model.num_prefix_tokens:].mean(1)], dim=-1)


def make_encoder(spec: dict[str, Any]) -> Encoder:
    """The architecture of a resolved preset, with whatever initial weights it is built with: for
    a model file's own weights (``load_state_dict`` follows), not a weights policy."""
    return ResNetTrunk(spec["arch"], spec) if spec["arch"] in RESNETS else TimmEncoder(spec)
