"""The painting of a demo slide's pixels: tissue, stroma, nuclei, the signal, pen marks, noise.

Each slide has 2–4 irregular tissue pieces with white lumens, eosin-like stroma with ordinary
nuclei, and pen marks where its ``SlideSpec`` asks for them. The learnable label: slides of
positive cases carry a few small regions (≤ 10 % of the tissue) of crowded, large, dark-purple
nuclei on lavender cytoplasm; negatives have none. The regions are small so that mean pooling
struggles and attention pooling wins. Colours come from the slide's scanner's ``Stain``; the
geometry and masks do not depend on them.

Everything follows from ``seed``: the same seed gives identical pixels. Ground truth for attention
maps is the signal mask at ``TRUTH_MPP`` µm/px over the level-0 extent (``truth_mask``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from e2epath.sources.demo.design import PEN_COLOURS, SlideSpec
from e2epath.sources.demo.scanners import Stain

CANVAS_MPP = 0.5  # µm/px the tissue is painted at; 40x slides are upsampled from it
MASK_MPP = 2.0  # µm/px of the coarse geometry (tissue pieces, lumens)
TRUTH_MPP = 4.0  # µm/px of the ground-truth signal masks written to truth/
SIGNAL_BUDGET = 0.08  # planned signal area / tissue area; stays under the promised 10 %


@dataclass
class RenderedSlide:
    """Level-0 pixels plus the generator's own masks (at ``mask_mpp`` µm/px)."""

    rgb: np.ndarray  # H × W × 3 uint8, level 0
    tissue: np.ndarray  # bool, tissue after lumens were cut out
    signal: np.ndarray  # bool, the positive texture (always inside tissue)
    mask_mpp: float


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: random values every ``cell`` pixels, cubic upsampled."""
    h, w = shape
    small = rng.standard_normal((max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)))
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, centre: tuple[float, float], axes: tuple[float, float], wobble: float,
          n: int = 96) -> np.ndarray:
    """An irregular closed polygon around ``centre`` (px), semi-axes ``axes`` (px)."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 7):
        r += rng.uniform(0, wobble) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    phi = rng.uniform(0, np.pi)
    x, y = axes[0] * r * np.cos(theta), axes[1] * r * np.sin(theta)
    pts = np.stack([centre[0] + x * np.cos(phi) - y * np.sin(phi),
                    centre[1] + x * np.sin(phi) + y * np.cos(phi)], axis=1)
    return np.round(pts).astype(np.int32)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """2–4 irregular tissue pieces, one per cell of a 2 × 2 grid, with white lumens cut out."""
    h, w = shape
    mask = np.zeros(shape, np.uint8)
    cells = rng.permutation(4)[: rng.integers(2, 5)]
    cw, ch = w / 2, h / 2
    for c in sorted(cells.tolist()):
        centre = ((c % 2 + 0.5 + rng.uniform(-0.08, 0.08)) * cw, (c // 2 + 0.5 + rng.uniform(-0.08, 0.08)) * ch)
        axes = (rng.uniform(0.32, 0.42) * cw, rng.uniform(0.32, 0.42) * ch)
        piece = np.zeros(shape, np.uint8)
        cv2.fillPoly(piece, [_blob(rng, centre, axes, 0.07)], 1)
        mask |= piece
    # ragged edges: threshold a blurred mask plus smooth noise confined to the edge band
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3)
    soft += 1.2 * soft * (1 - soft) * _smooth_noise(rng, shape, 6)
    mask = (soft > 0.5).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    for _ in range(rng.integers(3, 9) if len(ys) else 0):  # lumens, 25–70 µm semi-axes at scale 1
        k = rng.integers(len(ys))
        axes = (rng.uniform(0.025, 0.07) * w / 2, rng.uniform(0.027, 0.067) * h / 2)
        cv2.fillPoly(mask, [_blob(rng, (xs[k], ys[k]), axes, 0.05, 48)], 0)
    return mask.astype(bool)


def _signal_mask(rng: np.random.Generator, tissue: np.ndarray, mpp: float) -> np.ndarray:
    """3–5 small irregular discs (150–250 µm, shrunk to ``SIGNAL_BUDGET`` of the tissue) in tissue."""
    n = int(rng.integers(3, 6))
    diam_um = rng.uniform(150, 250, n)
    tissue_um2 = np.count_nonzero(tissue) * mpp**2
    planned = np.sum(np.pi * diam_um**2 / 4)
    if planned > SIGNAL_BUDGET * tissue_um2:
        diam_um *= math.sqrt(SIGNAL_BUDGET * tissue_um2 / planned)
    radius = diam_um / 2 / mpp
    # centres deep enough in tissue that most of each disc is tissue (found on a 4× coarser grid)
    small = cv2.resize(tissue.astype(np.uint8), (tissue.shape[1] // 4, tissue.shape[0] // 4),
                       interpolation=cv2.INTER_NEAREST)
    depth = cv2.distanceTransform(small, cv2.DIST_L2, 5) * 4
    signal = np.zeros(tissue.shape, np.uint8)
    placed: list[tuple[float, float, float]] = []
    for r in radius:
        ys, xs = np.nonzero(depth >= 0.6 * r)
        if len(ys) == 0:
            ys, xs = np.nonzero(small)
        for _ in range(200):  # prefer a centre that keeps the discs apart
            k = rng.integers(len(ys))
            cx, cy = xs[k] * 4 + 2.0, ys[k] * 4 + 2.0
            if all(math.hypot(cx - px, cy - py) > 1.2 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        cv2.fillPoly(signal, [_blob(rng, (cx, cy), (r, r * rng.uniform(0.8, 1.0)), 0.04, 64)], 1)
    return signal.astype(bool) & tissue


def _nuclei(rng: np.random.Generator, rgb: np.ndarray, region: np.ndarray, per_mm2: float,
            major_um: tuple[float, float], minor_um: tuple[float, float], colour: np.ndarray,
            strength: tuple[float, float], under: np.ndarray) -> None:
    """Paint anti-aliased ellipses centred in ``region`` onto ``rgb`` (uint8, in place).

    Each nucleus has colour ``under``·(1−s) + ``colour``·s with s drawn from ``strength``.
    """
    h, w = region.shape
    n = rng.poisson(per_mm2 * h * w * (CANVAS_MPP / 1000) ** 2)
    x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
    keep = region[y.astype(int), x.astype(int)]
    x, y = x[keep], y[keep]
    m = len(x)
    axes = np.stack([rng.uniform(*major_um, m), rng.uniform(*minor_um, m)], 1) / CANVAS_MPP / 2
    angle = rng.uniform(0, 180, m)
    s = rng.uniform(*strength, (m, 1))
    cols = (under * (1 - s) + colour * s).round().astype(int)
    for xi, yi, (a, b), t, c in zip(x, y, axes, angle, cols):
        cv2.ellipse(rgb, (int(xi * 16), int(yi * 16)), (int(a * 16), int(b * 16)), float(t), 0, 360,
                    c.tolist(), -1, cv2.LINE_AA, 4)


def _stroma(rng: np.random.Generator, shape: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """Eosin-like texture: colour ``base`` modulated by slow variation and fibre-like streaks."""
    fibres = cv2.GaussianBlur(_smooth_noise(rng, shape, 4), (0, 0), sigmaX=6, sigmaY=1)
    depth = np.clip(1 + 0.12 * _smooth_noise(rng, shape, 120) + 0.6 * fibres, 0.3, 1.8)
    # 255 − (255 − base)·depth per channel: more "stain" where depth is high
    return cv2.merge([cv2.convertScaleAbs(depth, alpha=-(255 - c), beta=255) for c in base])


def render_slide(spec: SlideSpec, seed: int, scale: float = 1.0, stain: Stain | None = None) -> RenderedSlide:
    """Paint one slide at ``CANVAS_MPP`` and resample it to its level-0 size.

    ``stain`` colours it (default: its scanner's); the masks and geometry do not depend on it.
    """
    stain = spec.scanner.stain if stain is None else stain
    rng = np.random.default_rng([seed, 3 + spec.scanner.stream, spec.index])
    w, h = spec.size(scale)
    canvas = (round(w * spec.mpp / CANVAS_MPP), round(h * spec.mpp / CANVAS_MPP))
    coarse = (max(8, round(w * spec.mpp / MASK_MPP)), max(8, round(h * spec.mpp / MASK_MPP)))
    tissue_small = _tissue_mask(rng, coarse[::-1])
    # smooth geometry at canvas resolution: linear upsampling, then threshold
    tissue = cv2.resize(tissue_small.astype(np.float32), canvas, interpolation=cv2.INTER_LINEAR) > 0.5
    signal = _signal_mask(rng, tissue, CANVAS_MPP) if spec.positive else np.zeros_like(tissue)

    shape = tissue.shape
    rgb = np.full((*shape, 3), stain.background, np.uint8)
    cv2.copyTo(_stroma(rng, shape, stain.eosin), tissue.astype(np.uint8), rgb)
    if signal.any():  # lavender cytoplasm under the tumour nuclei, soft-edged
        ys, xs = np.nonzero(signal[::4, ::4])
        y0, y1, x0, x1 = max(0, ys.min() * 4 - 16), ys.max() * 4 + 20, max(0, xs.min() * 4 - 16), xs.max() * 4 + 20
        a = 0.85 * cv2.GaussianBlur(signal[y0:y1, x0:x1].astype(np.float32), (0, 0), 3)[..., None]
        box = rgb[y0:y1, x0:x1]
        box[:] = (box * (1 - a) + stain.tumour_cytoplasm * a).round().astype(np.uint8)
    # stromal cells, lymphocytes; crowded large dark nuclei in the signal regions
    ordinary = tissue & ~signal
    _nuclei(rng, rgb, ordinary, 3500, (6, 10), (3, 5.5), stain.hematoxylin, (0.6, 0.9), stain.eosin)
    _nuclei(rng, rgb, ordinary, 800, (4.5, 6), (4, 5.5), stain.hematoxylin, (0.8, 1.0), stain.eosin)
    _nuclei(rng, rgb, signal, 9000, (10, 16), (7, 11), stain.tumour_nuclei, (0.75, 1.0),
            stain.tumour_cytoplasm)
    if spec.pen:
        _pen_mark(rng, rgb, spec.pen)
    noise = rng.integers(0, 7, shape, dtype=np.uint8)  # sensor noise, same on all channels
    rgb = cv2.subtract(cv2.add(rgb, cv2.merge([noise] * 3)), (3, 3, 3, 0))
    if canvas != (w, h):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    return RenderedSlide(rgb=rgb, tissue=tissue, signal=signal, mask_mpp=spec.mpp * w / canvas[0])


def _pen_mark(rng: np.random.Generator, rgb: np.ndarray, colour: str) -> None:
    """A thick ink arc, as when a pathologist circles a region; ink darkens multiplicatively."""
    h, w = rgb.shape[:2]
    pen = np.zeros((h, w), np.uint8)
    centre = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
    axes = (int(rng.uniform(0.2, 0.4) * w), int(rng.uniform(0.2, 0.4) * h))
    start = rng.uniform(0, 360)
    thickness = max(2, int(rng.uniform(60, 120) / CANVAS_MPP))
    cv2.ellipse(pen, centre, axes, float(rng.uniform(0, 180)), start, start + rng.uniform(90, 200), 255,
                thickness, cv2.LINE_AA)
    x, y, bw, bh = cv2.boundingRect(pen)
    if bw == 0 or bh == 0:
        return
    box = rgb[y:y + bh, x:x + bw]
    alpha = 0.8 * cv2.GaussianBlur(pen[y:y + bh, x:x + bw], (0, 0), 4).astype(np.float32)[..., None] / 255
    ink = np.array(PEN_COLOURS[colour], np.float32) / 255
    box[:] = (box * (1 - alpha * (1 - ink))).round().astype(np.uint8)


def truth_mask(slide: RenderedSlide) -> np.ndarray:
    """The signal mask at ``TRUTH_MPP`` over the level-0 extent, uint8 0/255."""
    h, w = slide.signal.shape
    f = slide.mask_mpp / TRUTH_MPP
    small = cv2.resize(slide.signal.astype(np.float32), (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
    return np.where(small > 0.5, 255, 0).astype(np.uint8)
