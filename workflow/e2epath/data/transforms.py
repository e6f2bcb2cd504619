"""Patches → model inputs: the one path from stored uint8 RGB patches to normalised tensors.

Training, evaluation of a full bag and two-stage feature extraction all call
:func:`resized_crops`: crop a box out of each uint8 patch [N, H, W, 3], flip it, resize it to the
encoder's input size (bilinear) and normalise it with the encoder's RGB statistics (ImageNet's
unless its preset says otherwise, `e2epath.presets`), in one batched
`grid_sample` on the device the model runs on. Training draws RandomResizedCrop boxes with optional
flips and shifts (:func:`crop_boxes`, geometric augmentation only); evaluation takes the centre crop
of the input size or the whole patch (:func:`eval_boxes`), features the whole patch
(:func:`model_inputs`), so a patch gives the same tensor wherever it is evaluated.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from e2epath.core.vocabulary import EVAL_CROPS
from e2epath.data.stats import IMAGENET_MEAN, IMAGENET_STD

Stats = tuple[float, float, float] | list[float]
# RandomResizedCrop's aspect ratio range (torchvision's); its area range is the recipe's crop_scale.
CROP_ASPECT = (3 / 4, 4 / 3)


def normalize(x: torch.Tensor, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> torch.Tensor:
    """uint8 RGB [..., H, W, 3] → float [..., 3, H, W] on x's device, normalised with ``mean`` and
    ``std`` (RGB, 0-1 scale; ImageNet's by default).

    The result is a permuted view of NHWC memory, i.e. channels_last for 4-d input.
    """
    mean = torch.as_tensor(np.asarray(mean, np.float32) * 255, device=x.device)
    inv_std = torch.as_tensor(1 / (np.asarray(std, np.float32) * 255), device=x.device)
    y = (x.float() - mean) * inv_std
    return y.movedim(-1, -3)


def crop_boxes(n: int, h: int, w: int, rng: np.random.Generator, *, hflip: bool, vflip: bool,
               crop_scale: float, translate: float) -> np.ndarray:
    """``n`` RandomResizedCrop boxes (area ``crop_scale``–1 of the patch, aspect 3/4–4/3), with
    random flips where ``hflip`` / ``vflip`` and a random shift of the content by up to
    ``translate`` of the patch side (the box then reaches past the patch: black fill, see
    :func:`resized_crops`): float32 [n, 6] = x0, y0, width, height, flip_x, flip_y (pixels of an
    h × w patch). The same numbers are drawn whatever is switched off, so switching one part off
    leaves the others' draws as they were."""
    area = h * w * rng.uniform(crop_scale, 1.0, n)
    aspect = np.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]), n))
    cw = np.minimum(w, np.round(np.sqrt(area * aspect)))
    ch = np.minimum(h, np.round(np.sqrt(area / aspect)))
    x0 = np.floor(rng.random(n) * (w - cw + 1))
    y0 = np.floor(rng.random(n) * (h - ch + 1))
    flips = (rng.random((n, 2)) < 0.5) & np.array([hflip, vflip])
    if translate > 0:  # the content moves by (tx, ty): the box, in the patch's own pixels, by minus that
        x0 -= np.round(rng.uniform(-translate, translate, n) * w)
        y0 -= np.round(rng.uniform(-translate, translate, n) * h)
    return np.column_stack([x0, y0, cw, ch, flips]).astype(np.float32)


def full_boxes(n: int, h: int, w: int) -> torch.Tensor:
    """Boxes that keep whole patches, unflipped (features, `eval_crop: whole`)."""
    return torch.tensor([[0, 0, w, h, 0, 0]], dtype=torch.float32).repeat(n, 1)


def eval_boxes(n: int, h: int, w: int, size: int, crop: str) -> torch.Tensor:
    """Evaluation boxes: the centre ``size`` × ``size`` crop of each patch (`center`, torchvision's
    CenterCrop; the whole patch when it is not larger), or the whole patch (`whole`)."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"eval_crop {crop!r} is not one of {EVAL_CROPS}")
    if crop == "whole" or (h <= size and w <= size):
        return full_boxes(n, h, w)
    cw, ch = min(size, w), min(size, h)
    return torch.tensor([[(w - cw) // 2, (h - ch) // 2, cw, ch, 0, 0]], dtype=torch.float32).repeat(n, 1)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int, fill: str = "border",
                  mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> torch.Tensor:
    """Crop ``boxes`` out of uint8 patches [N, H, W, 3], flip, resize to ``size`` (bilinear) and
    normalise (``mean``, ``std``): float [N, 3, size, size] on x's device. One batched `grid_sample` for the bag.
    Where a box reaches past its patch, ``fill`` `border` repeats the edge, `black` fills black
    (a shifted patch, as an affine translation of the image would)."""
    n, h, w = x.shape[:3]
    if n == 0:
        return torch.zeros(0, 3, size, size, device=x.device)
    b = boxes.to(x.device, torch.float32)
    sx = torch.where(b[:, 4] > 0, -1.0, 1.0) * b[:, 2] / w  # output [-1, 1] spans the box
    sy = torch.where(b[:, 5] > 0, -1.0, 1.0) * b[:, 3] / h
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, (2 * b[:, 0] + b[:, 2]) / w - 1], -1),
                         torch.stack([zero, sy, (2 * b[:, 1] + b[:, 3]) / h - 1], -1)], 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    if fill == "black":  # sample the pixels (zero outside = black), then normalise
        raw = F.grid_sample(x.float().movedim(-1, -3), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        return normalize(raw.movedim(-3, -1), mean, std)
    return F.grid_sample(normalize(x, mean, std), grid, mode="bilinear", padding_mode="border", align_corners=False)


def model_inputs(x: torch.Tensor, size: int, crop: str, mean: Stats = IMAGENET_MEAN,
                 std: Stats = IMAGENET_STD) -> torch.Tensor:
    """uint8 patches [N, H, W, 3] → normalised float [N, 3, size, size] on x's device: the whole
    patch resized (features), or its centre crop (`crop="center"`, E2E evaluation).

    The same values as :func:`resized_crops` with :func:`eval_boxes` up to float rounding (bilinear, half-pixel
    centres, edges repeated), computed the cheap way: the crop is a slice, the resize a plain
    bilinear interpolation (none when the crop already has the input size), and normalisation
    comes after the resize (it is per-channel affine, so the order does not matter) on the
    smaller image. Whole-slide inference spends its time in the encoder, not here.
    """
    n, h, w = x.shape[:3]
    if crop == "center":
        cw, ch = min(size, w), min(size, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        x = x[:, y0:y0 + ch, x0:x0 + cw]
    elif crop not in EVAL_CROPS:
        raise ValueError(f"eval_crop {crop!r} is not one of {EVAL_CROPS}")
    t = x.movedim(-1, -3).float()  # [N, 3, h, w], channels_last memory
    if tuple(t.shape[-2:]) != (size, size) and n:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    mean_t = torch.as_tensor(np.asarray(mean, np.float32) * 255, device=x.device).view(3, 1, 1)
    inv_std = torch.as_tensor(1 / (np.asarray(std, np.float32) * 255), device=x.device).view(3, 1, 1)
    return (t - mean_t) * inv_std
