"""Attention heatmaps over slide thumbnails: rows are test slides, columns are E2E ABMILX,
E2E ABMIL and two-stage ABMIL (whichever of them were trained).

Each patch is a square at its level-0 coords, of side the grid spacing of the coords (the patch
size in level-0 px: the patch grid does not overlap), coloured by its attention averaged over
heads and min–max normalised within the slide. Slide files are found through the QC table
(`results/slides.tsv`); training runs through `e2epath.layout`.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from e2epath.figures.common import FigureSkipped
from e2epath.layout import Run
from e2epath.slide import SlideError, open_slide

logger = logging.getLogger(__name__)

THUMB_PX = 512  # longest side of the thumbnail the heatmap is drawn on (a cell is ~480 px at 150 dpi)
CMAP = "jet"
ALPHA = 0.5
CELL_IN = 3.2
COLUMNS = (  # (title, family, must contain, must not contain) — matched on the method name
    ("E2E ABMILX", "e2e", "abmilx", None),
    ("E2E ABMIL", "e2e", "abmil", "abmilx"),
    ("two-stage ABMIL", "twostage", "abmil", "abmilx"),
)


@dataclass(frozen=True)
class SlideAttention:
    scores: np.ndarray  # (N,) mean over heads
    coords: np.ndarray  # (N, 2) level-0 x, y of each patch's top-left corner
    patch_l0: int  # patch side in level-0 px


def infer_patch_size(coords: np.ndarray) -> int | None:
    """The grid step of the coords (smallest positive gap in x or y); None for a single patch."""
    gaps = []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])
        if len(u) > 1:
            gaps.append(int(np.diff(u).min()))
    return min(gaps) if gaps else None


def slide_ids(npz) -> list[str]:
    return sorted(k for k in npz.files if not k.startswith("__") and not k.endswith("__coords"))


def read_slide(npz, slide: str, source: str) -> SlideAttention:
    """Attention and coords of one slide from an open attention.npz; errors name file and key."""
    if f"{slide}__coords" not in npz.files:
        raise ValueError(f"{source}: key {slide}__coords missing (see docs/contracts.md attention.npz)")
    att = np.asarray(npz[slide], dtype=np.float64)
    coords = np.asarray(npz[f"{slide}__coords"]).astype(np.int64).reshape(-1, 2)
    att = att.reshape(1, -1) if att.ndim == 1 else att
    if att.shape[1] != len(coords):
        raise ValueError(f"{source}: {slide} has {att.shape[1]} attention values but {len(coords)} coords")
    return SlideAttention(att.mean(axis=0), coords, infer_patch_size(coords) or 0)


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map (uniform attention) becomes 0.5 everywhere."""
    if x.size == 0:
        return x.astype(float)
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.full_like(x, 0.5, dtype=float) if hi <= lo else (x - lo) / (hi - lo)


def attention_raster(coords: np.ndarray, scores: np.ndarray, patch_l0: float,
                     shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """(h, w) map over a thumbnail of ``shape`` (level-0 px per thumbnail px = ``downsample`` x, y):
    each patch square holds its score (the larger where squares overlap), NaN off the patches."""
    h, w = shape
    dx, dy = downsample
    out = np.full((h, w), np.nan)
    x0 = np.clip(np.floor(coords[:, 0] / dx).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] / dy).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_l0) / dx).astype(int), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_l0) / dy).astype(int), y0 + 1, h)
    for i in np.argsort(scores, kind="stable"):  # ascending: the higher score wins an overlap
        out[y0[i]:y1[i], x0[i]:x1[i]] = scores[i]
    return out


def overlay(rgb: np.ndarray, raster: np.ndarray, alpha: float = ALPHA, cmap: str = CMAP) -> np.ndarray:
    """The thumbnail with the raster's colours blended in where it is defined (one image to draw,
    so the figure stays small and fast to save)."""
    colour = matplotlib.colormaps[cmap](np.nan_to_num(raster))[..., :3] * 255
    out = rgb.astype(np.float64)
    on = ~np.isnan(raster)
    out[on] = (1 - alpha) * out[on] + alpha * colour[on]
    return np.round(out).astype(np.uint8)


def thumbnail(path: str | Path, max_px: int = THUMB_PX) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB thumbnail and its level-0 px per thumbnail px (x, y)."""
    osr = open_slide(path)  # e2epath.slide: the one module that touches OpenSlide
    try:
        w0, h0 = osr.dimensions
        rgb = np.asarray(osr.get_thumbnail((max_px, max_px)).convert("RGB"))
    finally:
        osr.close()
    return rgb, (w0 / rgb.shape[1], h0 / rgb.shape[0])


def choose_methods(keys: list[tuple[str, str]]) -> list[tuple[str, tuple[str, str]]]:
    """(column title, method key) for each column whose aggregator was trained."""
    out = []
    for title, family, has, hasnt in COLUMNS:
        hits = sorted(k for k in keys if k[0] == family and has in k[1].lower()
                      and (hasnt is None or hasnt not in k[1].lower()))
        if hits:
            if len(hits) > 1:
                logger.info("attention: %s column shows %s (also matching: %s)", title, hits[0][1],
                            ", ".join(k[1] for k in hits[1:]))
            out.append((title, hits[0]))
    return out


def slide_path(slide: str, slides: pd.DataFrame) -> Path | None:
    """The slide file from the QC table; None (logged) when the slide failed QC or is not in it."""
    rows = slides[slides["slide_id"].astype(str) == slide]
    if rows.empty:
        logger.warning("attention: slide %s is not in the QC table — not shown", slide)
        return None
    row = rows.iloc[0]
    if row["status"] != "ok":
        logger.warning("attention: slide %s failed QC (%s) — not shown", slide, row.get("error"))
        return None
    return Path(row["path"])


def plot_attention(runs: list[Run], slides: pd.DataFrame, n_slides: int = 3, seed: int = 0,
                   title: str = "") -> Figure:
    """``runs``: training runs whose attention.npz exists; ``slides``: the QC table (slide paths)."""
    with ExitStack() as stack:  # the npz files stay open (lazily read) until the figure is drawn
        return _plot_attention(stack, runs, slides, n_slides, seed, title)


def _plot_attention(stack: ExitStack, runs: list[Run], slides: pd.DataFrame, n_slides: int, seed: int,
                    title: str) -> Figure:
    by_key: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    columns = choose_methods(list(by_key))
    if not columns:
        raise FigureSkipped(f"no attention from an ABMILX / ABMIL method (methods: "
                            f"{sorted(m for _, m in by_key) or 'none'})")
    npzs = {key: [(f, stack.enter_context(np.load(f.path("attention"))))
                  for f in sorted(by_key[key], key=lambda f: f.fold)] for _, key in columns}
    where = {key: {s: (f, z) for f, z in npzs[key] for s in slide_ids(z)} for key in npzs}
    common = sorted(set.intersection(*(set(w) for w in where.values())))
    if not common:
        raise FigureSkipped("the attention files share no slide")
    thumbs = {}
    for s in np.random.default_rng(seed).permutation(common):  # seeded choice of the slides shown
        p = slide_path(str(s), slides)
        if p is None:
            continue
        try:
            thumbs[str(s)] = thumbnail(p)
        except SlideError as err:
            logger.warning("attention: slide %s not shown: %s", s, err)
        if len(thumbs) == n_slides:
            break
    if not thumbs:
        raise FigureSkipped("no candidate slide has a readable slide file")
    logger.info("attention: slides %s (seed %d) × columns %s", ", ".join(thumbs), seed,
                ", ".join(f"{t} = {k[0]}/{k[1]}" for t, k in columns))
    heights = [CELL_IN * t.shape[0] / t.shape[1] for t, _ in thumbs.values()]
    fig = Figure(figsize=(CELL_IN * len(columns) + 0.8, sum(heights) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(thumbs), len(columns), squeeze=False,
                                      gridspec_kw={"height_ratios": heights}))
    for r, (slide, (rgb, ds)) in enumerate(thumbs.items()):
        for c, (col_title, key) in enumerate(columns):
            f, z = where[key][slide]
            att = read_slide(z, slide, str(f.path("attention")))
            if att.patch_l0 <= 0:
                logger.warning("attention: %s %s has a single patch (no grid spacing); drawn as one "
                               "thumbnail pixel", key[1], slide)
            raster = attention_raster(att.coords, minmax(att.scores), max(att.patch_l0, 1), rgb.shape[:2], ds)
            ax = axes[r, c]
            ax.imshow(overlay(rgb, raster), interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{col_title}\n{key[1]}", fontsize=9)
            if c == 0:
                ax.set_ylabel(slide, fontsize=8)
            ax.set_xlabel(f"fold {f.fold}, {len(att.scores)} patches", fontsize=7)
    fig.colorbar(ScalarMappable(Normalize(0, 1), CMAP), ax=axes, shrink=0.6,
                 label="attention (min–max per slide)")
    if title:
        fig.suptitle(title)
    return fig
