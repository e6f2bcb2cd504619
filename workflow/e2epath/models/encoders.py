"""Patch encoders: torchvision ResNet-18/50 cut after `layer3`, global average pooled, and the one
weights policy of every encoder e2epath builds (end to end and two-stage).

The paper (W. Tang et al., "Revisiting End-to-End Learning with Slide-level Supervision in
Computational Pathology", NeurIPS 2025, arXiv:2506.02408; appendix B.3) removes the last ResNet
stage to match the classic two-stage features: ResNet-18 gives 256-d, ResNet-50 1024-d instance
features. Parameter names are torchvision's
(`conv1`, `bn1`, `layer1`..`layer3`), so a torchvision state dict loads after dropping
`layer4.*` and `fc.*`.

Weights are never downloaded (compute nodes are often offline and a silent download hides which
weights a result used):

- `None`: random init (logged as a warning);
- `"imagenet"`: torchvision's ImageNet checkpoint from the torch hub cache, else a clear error;
- `"auto"`: ImageNet when the cache has it, else random init (logged);
- any other string: a local state-dict file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Output width after layer3, and the torchvision ImageNet weight enums to look for (first wins);
# one entry per name of e2epath.vocabulary.ENCODERS (tests/test_architecture.py).
ARCHITECTURES: dict[str, tuple[int, tuple[str, ...]]] = {
    "resnet18": (256, ("ResNet18_Weights.IMAGENET1K_V1",)),
    "resnet50": (1024, ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2")),
}
DROPPED_PREFIXES = ("layer4.", "fc.")


class ResNetTrunk(nn.Module):
    """conv1 … layer3 of a torchvision ResNet + global average pooling.

    `[B, 3, H, W]` → `[B, out_dim]`.
    """

    def __init__(self, arch: str) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = ARCHITECTURES[arch][0]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def imagenet_checkpoint_paths(arch: str) -> list[Path]:
    """Where torchvision would have cached the ImageNet checkpoint(s) of `arch`, in preference order."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    paths = []
    for enum_name in ARCHITECTURES[arch][1]:
        enum, member = enum_name.split(".")
        url = getattr(getattr(torchvision.models, enum), member).url
        paths.append(folder / url.rsplit("/", 1)[-1])
    return paths


def find_imagenet_checkpoint(arch: str) -> Path | None:
    return next((p for p in imagenet_checkpoint_paths(arch) if p.is_file()), None)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a file; unwraps `{"state_dict": ...}` / `{"model": ...}` checkpoints."""
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist; pass weights=None for "
                                "random init or 'imagenet' to use the torch hub cache")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"encoder weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_trunk_weights(trunk: ResNetTrunk, path: Path, arch: str) -> None:
    """Load a trunk or full-ResNet state dict (layer4 / fc dropped), strictly otherwise."""
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(DROPPED_PREFIXES)}
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"encoder weights file {path} does not match a torchvision {arch} "
                         f"(conv1 … layer3): {err}") from err
    logger.info("encoder %s: weights loaded from %s", arch, path)


def build_encoder(name: str, weights: str | None, seed: int | None = None) -> ResNetTrunk:
    """A ResNet trunk (`out_dim` 256 for resnet18, 1024 for resnet50) with the requested weights.

    ``seed`` seeds torch's global generator first, so every job of a run (each fold, each slide's
    feature extraction) builds the very same randomly initialised layers.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ARCHITECTURES)}")
    if seed is not None:
        torch.manual_seed(seed)
    trunk = ResNetTrunk(name)
    if weights in ("imagenet", "auto"):
        found = find_imagenet_checkpoint(name)
        if found is not None:
            load_trunk_weights(trunk, found, name)
            return trunk
        if weights == "imagenet":
            tried = ", ".join(str(p) for p in imagenet_checkpoint_paths(name))
            raise FileNotFoundError(
                f"ImageNet weights for {name} not found (tried: {tried}). Weights are never downloaded: "
                f"copy torchvision's checkpoint to one of these paths (or point TORCH_HOME at a cache "
                f"holding it), pass the file itself as weights=<path>, or use weights=None for random init")
        weights = None
    if weights is None:
        logger.warning("encoder %s: random init, no ImageNet weights", name)
        return trunk
    load_trunk_weights(trunk, Path(weights).expanduser(), name)
    return trunk
