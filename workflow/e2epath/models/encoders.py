"""Patch encoders: torchvision ResNet-18/50 cut after `layer3`, global average pooled, and the one
weights policy of every encoder e2epath builds (end to end and two-stage).

The paper (W. Tang et al., "Revisiting End-to-End Learning with Slide-level Supervision in
Computational Pathology", NeurIPS 2025, arXiv:2506.02408; appendix B.3) removes the last ResNet
stage to match the classic two-stage features: ResNet-18 gives 256-d, ResNet-50 1024-d instance
features. Parameter names are torchvision's
(`conv1`, `bn1`, `layer1`..`layer3`), so a torchvision state dict loads after dropping
`layer4.*` and `fc.*`.

The weights policy (`weights:` of a method, E2E and two-stage alike); never a silent random init:

- `"imagenet"` (the default): torchvision's ImageNet checkpoint from the torch hub cache
  (`$TORCH_HOME`, default ~/.cache/torch). The workflow's `imagenet_weights` job puts it there once
  before any training job starts — from the cache, or with torchvision's own download where the
  machine (on a cluster: the submit host) is online — and fails with the cache path and the
  alternatives when it can be had neither way (`fetch_imagenet`). Training and feature jobs never
  download (compute nodes are often offline): a missing checkpoint is an error naming the path.
- any other string: a local state-dict file (a full torchvision ResNet or the trunk);
- `None`: random initialisation, said in the log;
- `"auto"` is refused (it used to fall back to random init without a word).
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


def _missing_imagenet(arch: str, why: str) -> str:
    tried = ", ".join(str(p) for p in imagenet_checkpoint_paths(arch))
    return (f"ImageNet weights for {arch} are not in the torch cache ({tried}) and {why}. Copy torchvision's "
            f"checkpoint there (or point TORCH_HOME at a cache holding it), give the file itself as "
            f"`weights: <file>`, or train from scratch with `weights: null`")


def fetch_imagenet(arch: str) -> Path:
    """The cached ImageNet checkpoint of ``arch``, downloaded first with torchvision's own download
    (into the torch hub cache) when it is not there; a FileNotFoundError saying where it was looked
    for and what to do when it can be had neither way."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown encoder {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    found = find_imagenet_checkpoint(arch)
    if found is not None:
        logger.info("encoder %s: ImageNet weights in the torch cache: %s", arch, found)
        return found
    enum, member = ARCHITECTURES[arch][1][0].split(".")
    weights = getattr(getattr(torchvision.models, enum), member)
    logger.info("encoder %s: downloading torchvision's ImageNet weights %s into %s", arch, weights.url,
                imagenet_checkpoint_paths(arch)[0].parent)
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - offline, proxy, disk: say what to do instead
        raise FileNotFoundError(_missing_imagenet(arch, f"could not be downloaded ({type(err).__name__}: {err})")) \
            from err
    found = find_imagenet_checkpoint(arch)
    if found is None:
        raise FileNotFoundError(_missing_imagenet(arch, "torchvision's download did not leave it there"))
    return found


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(weights: str | None, pretrained: list[Path]) -> dict:
    """What an encoder's weights were, for the files a job writes: the source, and for a
    checkpoint its path and sha256 — from the imagenet_weights record or the weights file the
    workflow hands the job (``pretrained``), else from the cache / the configured file itself."""
    if weights is None:
        return {"weights": None}
    if weights == "imagenet":
        if pretrained:
            import json

            rec = json.loads(Path(pretrained[0]).read_text())
            return {"weights": "imagenet", "path": rec["path"], "sha256": rec["sha256"]}
        raise ValueError("weights: imagenet needs the imagenet_weights record (--pretrained RECORD.json, written "
                         "by `python -m e2epath imagenet_weights`)")
    source = Path(pretrained[0]) if pretrained else Path(weights).expanduser()
    return {"weights": str(weights), "path": str(source.resolve()), "sha256": file_sha256(source)}


def cli_fetch(argv: list[str] | None = None) -> int:
    """`python -m e2epath imagenet_weights --encoder resnet50 --out RECORD.json`: torchvision's
    ImageNet checkpoint in the torch cache (downloaded there if needed and possible), recorded as
    {encoder, path, sha256}; exit 1 with what to do when it can be had neither way."""
    import argparse

    from ..io import write_json

    ap = argparse.ArgumentParser(prog="e2epath imagenet_weights", description=cli_fetch.__doc__)
    ap.add_argument("--encoder", required=True, choices=sorted(ARCHITECTURES))
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        path = fetch_imagenet(a.encoder)
    except FileNotFoundError as err:
        logger.error("%s", err)
        return 1
    write_json(a.out, {"encoder": a.encoder, "path": str(path), "sha256": file_sha256(path)})
    logger.info("encoder %s: %s recorded in %s", a.encoder, path, a.out)
    return 0


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a file; unwraps `{"state_dict": ...}` / `{"model": ...}` checkpoints."""
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist; give an existing file, "
                                "`weights: imagenet` for torchvision's ImageNet weights, or `weights: null` "
                                "for random initialisation")
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
    if weights == "auto":
        raise ValueError("weights: auto is gone (it fell back to random init without a word); use imagenet, "
                         "a weights file, or null for random initialisation")
    if seed is not None:
        torch.manual_seed(seed)
    trunk = ResNetTrunk(name)
    if weights == "imagenet":
        found = find_imagenet_checkpoint(name)
        if found is None:
            raise FileNotFoundError(_missing_imagenet(name, "jobs never download (the imagenet_weights job fetches "
                                                            "it before training)"))
        load_trunk_weights(trunk, found, name)
        return trunk
    if weights is None:
        logger.warning("encoder %s: random initialisation (weights: null), no pretrained weights", name)
        return trunk
    load_trunk_weights(trunk, Path(weights).expanduser(), name)
    return trunk
