"""Checkpoint files into encoders: state dicts from ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt``
(common wrappers unwrapped), converted from the layouts models are published in (a torchvision
ResNet's extra stage, CTransPath's old-timm Swin, a transformers DINOv2), and loaded strictly: a
missing or unexpected key or a shape mismatch is an error naming the file and the encoder.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from e2epath.models.encoders import Encoder, ResNetTrunk, TimmEncoder
from e2epath.models.presets import EncoderError

logger = logging.getLogger(__name__)

DROPPED_PREFIXES = ("layer4.", "fc.")  # torchvision ResNet keys the trunk has no use for


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
