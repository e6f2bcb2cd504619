"""How a full bag goes through a trained model — the one path of validation and test predictions,
external cohorts and `python -m e2epath predict`, for both families (`predict_bag`).

End to end: every patch of the evaluation magnification, its centre crop (or the whole patch:
``eval_crop``) at the input size, normalised with the encoder's statistics, encoded in chunks of
``eval_chunk`` under no_grad (autocast on CUDA), then the aggregator over all of them. Two-stage: the
aggregator over the bag's frozen features (`e2epath.features.files.FeatureBag`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from e2epath.data.bags import Bag, iter_full_bag
from e2epath.data.decoding import decode_threads_for
from e2epath.data.stats import IMAGENET_MEAN, IMAGENET_STD
from e2epath.data.transforms import model_inputs
from e2epath.features.files import FeatureBag
from e2epath.models.e2e import E2EModel

Parts = list[tuple[str, np.ndarray]]  # the bag's slides in order, each with its patches' level-0 coords


def stats(spec: dict) -> tuple:
    """The encoder's normalisation (mean, std), ImageNet's for a spec without a preset."""
    enc = spec.get("encoder_spec") or {}
    return tuple(enc.get("mean", IMAGENET_MEAN)), tuple(enc.get("std", IMAGENET_STD))


@torch.no_grad()
def predict_bag(net: nn.Module, bag: Bag | FeatureBag, spec: dict, dev: torch.device,
                decode_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Parts]:
    """(logits [1, outputs] float32, attention [heads, N], the bag's slides and coords) of one full
    bag: patches through an E2E model (``bag`` a `Bag`), or features through a two-stage aggregator
    (``bag`` a `FeatureBag`). ``decode_threads``: JPEG decoding threads beside the encoder (default:
    `decode_threads_for`); the result does not depend on it."""
    net.eval()
    if isinstance(bag, FeatureBag):
        out, attn = net(bag.features[None].to(dev), return_attention=True)
        return out.float(), attn[0], bag.parts
    return _predict_patches(net, bag, spec, dev, decode_threads)


@torch.no_grad()
def _predict_patches(model: E2EModel, bag: Bag, spec: dict, dev: torch.device, decode_threads: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, np.ndarray]]]:
    """One full bag through the model: every patch of the eval magnification, its centre crop
    (or whole: ``eval_crop``) at the input size, encoded in chunks of ``eval_chunk``; the
    aggregator over all of them; the next chunks are decoded in ``decode_threads`` threads
    (default: `decode_threads_for`) while the encoder runs (the same patches in the same order
    whatever the count). (logits [1, outputs], attention [heads, N], [(slide, coords)])."""
    mag, size, chunk, crop = spec["eval_magnification"], spec["input_size"], spec["eval_chunk"], spec["eval_crop"]
    mean, std = stats(spec)
    feats, parts = [], []
    threads = decode_threads_for(dev) if decode_threads is None else decode_threads
    for slide, coords, x in iter_full_bag(bag, mag, chunk, threads):
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            feats.append(model.encode(model_inputs(x.to(dev), size, crop, mean, std)).float())
        parts.append((slide, coords))
    if not feats:
        raise RuntimeError(f"{spec['bag']} {bag.unit_id}: no patches at {mag}x for evaluation")
    out, attn = model.aggregator(torch.cat(feats)[None], return_attention=True)
    return out.float(), attn[0], _merge(parts)


def _merge(parts):
    """Chunks of one slide → one (slide, coords) entry, keeping slide order."""
    merged: dict[str, list] = {}
    for slide, coords in parts:
        merged.setdefault(slide, []).append(coords)
    return [(s, np.concatenate(c)) for s, c in merged.items()]
