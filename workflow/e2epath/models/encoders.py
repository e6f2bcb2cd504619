"""Patch encoders: the presets of `e2epath.presets` built, and the one weights policy of every
encoder e2epath builds (end to end and two-stage).

- ResNets: torchvision ResNet-18/50 cut after `layer3`, global average pooled. The paper (W. Tang et
  al., "Revisiting End-to-End Learning with Slide-level Supervision in Computational Pathology",
  NeurIPS 2025, arXiv:2506.02408; appendix B.3) removes the last ResNet stage to match the classic
  two-stage features: ResNet-18 gives 256-d, ResNet-50 1024-d. Parameter names are torchvision's
  (`conv1`, `bn1`, `layer1`..`layer3`), so a torchvision state dict loads after dropping
  `layer4.*` and `fc.*`.
- `timm:<name>`: a timm model built with the preset's kwargs (`num_classes: 0`), its embedding the
  model's pooled output or class token + mean patch token (`TimmEncoder`); `ctranspath`: timm's
  Swin-T with CTransPath's convolutional stem (`ConvStem`).

The weights policy (`weights:` of an encoder or method); never a silent random init:

- `"imagenet"` (ResNets): torchvision's ImageNet checkpoint from the torch hub cache
  (`$TORCH_HOME`, default ~/.cache/torch). The workflow's `encoder_weights` job puts it there once
  before any training job starts — from the cache, or with torchvision's own download where the
  machine (on a cluster: the submit host) is online — and fails with the cache path and the
  alternatives when it can be had neither way (`fetch_imagenet`). Training and feature jobs never
  download (compute nodes are often offline): a missing checkpoint is an error naming the path.
- `"hf:<org>/<repo>/<file>"`: a file of a Hugging Face repository from the local Hugging Face cache
  only (`$HF_HUB_CACHE`); never downloaded — the error says where it was looked for and how to get it.
- any other string: a local state-dict file (`.safetensors`, `.bin`, `.pth`, `.pt`; `state_dict`,
  `model`, `module.` wrappers unwrapped), loaded strictly: a missing or unexpected key or a shape
  mismatch is an error naming the file and the encoder;
- `None`: random initialisation, said in the log (never for a foundation model);
- `"auto"` is refused (it used to fall back to random init without a word).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from e2epath.models.presets import (
    PRESETS,
    EncoderError,
    check_weights,
    encoder_spec,
    parse_hub,
    weights_source,
)

logger = logging.getLogger(__name__)

# The torchvision ImageNet weight enums of the ResNet presets, in preference order (first wins).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1",),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"),
}
DROPPED_PREFIXES = ("layer4.", "fc.")  # torchvision ResNet keys the trunk has no use for


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


def imagenet_checkpoint_paths(arch: str) -> list[Path]:
    """Where torchvision would have cached the ImageNet checkpoint(s) of `arch`, in preference order."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    paths = []
    for enum_name in ARCHITECTURES[arch]:
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
    enum, member = ARCHITECTURES[arch][0].split(".")
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


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def hub_file(weights: str, encoder: str = "") -> Path:
    """The local file of ``hf:<org>/<repo>/<file>``, from the local cache only (never downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    repo, name = parse_hub(weights)
    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo, name, cache_dir=cache)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    who = f"encoder {encoder}: " if encoder else ""
    raise FileNotFoundError(
        f"{who}weights {weights}: {name} of {repo} is not in the local Hugging Face cache {cache} "
        f"(looked for {cache / ('models--' + repo.replace('/', '--'))}/snapshots/*/{name}); e2epath never downloads "
        f"at run time. On a machine with internet, accept the model's terms on huggingface.co/{repo} if it is "
        f"gated, then `hf download {repo} {name}` with the same HF_HUB_CACHE (or HF_HOME) the jobs see; or give "
        "the file itself as weights: <path>")


def resolve_weights_file(weights: str, encoder: str) -> Path:
    """The local checkpoint file behind a weights value (imagenet: the torch cache; hf: the
    Hugging Face cache; else the path itself); FileNotFoundError saying where and how to get it."""
    source = weights_source(weights)
    if source == "imagenet":
        found = find_imagenet_checkpoint(encoder)
        if found is None:
            raise FileNotFoundError(_missing_imagenet(encoder, "jobs never download (the encoder_weights job "
                                                               "fetches it before training)"))
        return found
    if source == "hub":
        return hub_file(weights, encoder)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder {encoder}: weights file {path} does not exist; give an existing file "
                                "(.safetensors, .bin, .pth, .pt), a hf:<org>/<repo>/<file> id in the local Hugging "
                                "Face cache, imagenet (ResNets), or null for random initialisation (not for a "
                                "foundation model)")
    return path


def weights_record(weights: str | None, pretrained: list[Path]) -> dict:
    """What an encoder's weights were, for the files a job writes: the source, and for a
    checkpoint its path and sha256 — from the encoder_weights record (imagenet, hf) or the weights
    file the workflow hands the job (``pretrained``), else from the file itself."""
    if weights is None:
        return {"weights": None}
    if weights_source(weights) in ("imagenet", "hub"):
        if pretrained:
            import json

            rec = json.loads(Path(pretrained[0]).read_text())
            return {"weights": weights, "path": rec["path"], "sha256": rec["sha256"]}
        raise ValueError(f"weights {weights} need the encoder_weights record (--pretrained RECORD.json, written "
                         "by `python -m e2epath encoder_weights`)")
    source = Path(pretrained[0]) if pretrained else Path(weights).expanduser()
    return {"weights": str(weights), "path": str(source.resolve()), "sha256": file_sha256(source)}


def cli_weights(argv: list[str] | None = None) -> int:
    """`python -m e2epath encoder_weights --encoder NAME --weights W --out RECORD.json`: the
    checkpoint of ``imagenet`` (torchvision's, in the torch cache; downloaded there if needed and
    possible) or of ``hf:<org>/<repo>/<file>`` (the local Hugging Face cache only), recorded as
    {encoder, weights, path, sha256}; exit 1 with where it was looked for and what to do."""
    import argparse

    from e2epath.core.io import write_json

    ap = argparse.ArgumentParser(prog="e2epath encoder_weights", description=cli_weights.__doc__)
    ap.add_argument("--encoder", required=True, help="the encoder's name (the record's)")
    ap.add_argument("--arch", required=True, help="its architecture (imagenet: resnet18 or resnet50)")
    ap.add_argument("--weights", required=True, help="imagenet or hf:<org>/<repo>/<file>")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    source = weights_source(a.weights)
    if source not in ("imagenet", "hub"):
        ap.error(f"--weights {a.weights!r}: imagenet or hf:<org>/<repo>/<file> (files need no record)")
    try:
        if source == "imagenet":
            arch = a.arch
            if arch not in ARCHITECTURES:
                ap.error(f"--weights imagenet is for {', '.join(ARCHITECTURES)}, not {arch}")
            path = fetch_imagenet(arch)
        else:
            path = hub_file(a.weights, a.encoder)
    except (FileNotFoundError, EncoderError) as err:
        logger.error("%s", err)
        return 1
    write_json(a.out, {"encoder": a.encoder, "weights": a.weights, "path": str(path), "sha256": file_sha256(path)})
    logger.info("encoder %s: weights %s = %s recorded in %s", a.encoder, a.weights, path, a.out)
    return 0


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (the only one torch.load can memory-map)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def load_checkpoint(path: Path, encoder: str = "") -> dict[str, Tensor]:
    """A state dict from a .safetensors / .bin / .pth / .pt file; unwraps ``{"state_dict": ...}``,
    ``{"model": ...}``, ``{"module": ...}`` checkpoints and a ``module.`` prefix (DataParallel)."""
    who = f"encoder {encoder}: " if encoder else ""
    if not path.is_file():
        raise FileNotFoundError(f"{who}weights file {path} does not exist; give an existing file, `weights: imagenet` "
                                "for torchvision's ImageNet weights (ResNets), or `weights: null` for random "
                                "initialisation")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:  # memory-mapped where the format allows it: a 4 GB checkpoint is not read into memory twice
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except Exception as err:  # noqa: BLE001 - pickle / zip errors: name the file
            raise EncoderError(f"{who}weights file {path} cannot be read as a torch checkpoint "
                               f"({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderError(f"{who}weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def dinov2_from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``Dinov2Model`` state dict (Phikon-v2) with timm's ViT names: q, k and v
    projections concatenated into ``qkv``, layer scales to ``ls*.gamma``, the mask token dropped.
    Both transformers layouts are read: ``attention.attention.query`` / ``attention.output.dense``
    (checkpoints written by transformers 4) and ``attention.q_proj`` / ``attention.o_proj`` (5)."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    if not any(k.startswith("embeddings.") for k in state):
        return state  # timm names already
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    parts = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
        if not m:
            out[key] = value  # left as it is: strict loading names it
            continue
        block, rest = m.groups()
        qm = re.match(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$", rest)
        if qm:
            which = qm.group(1) or {"q": "query", "k": "key", "v": "value"}[qm.group(2)]
            qkv.setdefault((block, qm.group(3)), {})[which] = value
            continue
        for hf, timm_name in parts.items():
            if rest.startswith(hf + ".") or rest == hf:
                out[f"blocks.{block}.{timm_name}{rest[len(hf):]}"] = value
                break
        else:
            out[key] = value
    for (block, kind), pieces in qkv.items():
        if set(pieces) != {"query", "key", "value"}:
            raise EncoderError(f"block {block}: the checkpoint lacks {sorted({'query', 'key', 'value'} - set(pieces))}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([pieces["query"], pieces["key"], pieces["value"]])
    return out


def adapt_checkpoint(encoder: Encoder, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's keys in the encoder's names: a ResNet's layer4 / fc dropped; a timm model's
    classifier head dropped (the encoders are headless); CTransPath's old-timm Swin layout and a
    transformers DINOv2 layout converted."""
    if isinstance(encoder, ResNetTrunk):
        return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    if encoder.spec["arch"] == "ctranspath":
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, encoder.model)
    if encoder.spec["arch"].endswith("_dinov2"):
        state = dinov2_from_transformers(state)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_weights(encoder: Encoder, path: Path) -> None:
    """Load ``path`` into ``encoder`` strictly: every key present, none unexpected, every shape equal;
    otherwise an error naming the file, the encoder and the first offending keys."""
    name, arch = encoder.spec["name"], encoder.spec["arch"]
    state = adapt_checkpoint(encoder, load_checkpoint(path, name))
    target = encoder.model if isinstance(encoder, TimmEncoder) else encoder
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … ({len(items)} in all)" if len(items) > 5 else "")
        problems = [f"missing keys: {few(missing)}" if missing else "",
                    f"unexpected keys: {few(unexpected)}" if unexpected else "",
                    f"shape mismatches (file vs encoder): {few(shapes)}" if shapes else ""]
        raise EncoderError(f"weights file {path} does not fit encoder {name} ({arch}): "
                           + "; ".join(p for p in problems if p)
                           + ". Is it the checkpoint of this model? Check the file, or the encoder's arch and kwargs")
    target.load_state_dict(state, strict=True)
    logger.info("encoder %s: weights loaded from %s", name, path)


def make_encoder(spec: dict[str, Any]) -> Encoder:
    """The architecture of a resolved preset, with whatever initial weights it is built with: for
    a model file's own weights (``load_state_dict`` follows), not a weights policy."""
    return ResNetTrunk(spec["arch"], spec) if spec["arch"] in ARCHITECTURES else TimmEncoder(spec)


def build_encoder(encoder: str | dict[str, Any], weights: Any = "preset", seed: int | None = None) -> Encoder:
    """The encoder ``encoder`` (a preset name or a resolved spec from `e2epath.presets`) with
    ``weights`` (default: the spec's own; see the module docstring). ``out_dim`` is its embedding width.

    ``seed`` seeds torch's global generator first, so every job of a run (each fold, each slide's
    feature extraction) builds the very same randomly initialised layers.
    """
    if isinstance(encoder, str):
        if encoder not in PRESETS:
            raise ValueError(f"unknown encoder {encoder!r}; presets: {', '.join(PRESETS)} (others are defined in "
                             "the config's encoders section)")
        encoder = encoder_spec(encoder)
    spec = encoder
    if weights == "preset":
        weights = spec["weights"]
    check_weights(spec, weights, f"encoder {spec['name']}")
    if seed is not None:
        torch.manual_seed(seed)
    model = make_encoder(spec)
    if weights is None:
        logger.warning("encoder %s: random initialisation (weights: null), no pretrained weights", spec["name"])
        return model
    load_weights(model, resolve_weights_file(weights, spec["arch"] if weights == "imagenet" else spec["name"]))
    return model
