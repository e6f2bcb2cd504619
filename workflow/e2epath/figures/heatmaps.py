"""Attention maps: one renderer for the task figure's panel (rows are test slides, columns are E2E
ABMILX, E2E ABMIL and two-stage ABMIL, whichever were trained) and for slide-level maps (a PNG at a
chosen µm per pixel, a montage of the most and least attended patches, and a GeoJSON of the
patches that QuPath imports as detections), which `e2epath.figures.maps` writes for
`python -m e2epath predict` and for the workflow's `slide_maps` step.

Each patch is a square at its level-0 coords, of side the patch size in level-0 px, coloured by
its attention averaged over heads, as a percentile within the slide (so a few extreme patches do
not wash out the rest), over the slide image; tissue contours are drawn where given. Rasters are
at the output resolution only (a 10^5-patch slide at 8 µm/px is a few megapixels), and the slide
image is read tile by tile at that resolution. Slide files are found through the QC table
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

from e2epath.core import seeds
from e2epath.core.layout import Run
from e2epath.figures.common import FigureSkipped
from e2epath.slide.reader import SlideError, open_slide, read_at_mpp
from e2epath.train.attention import read_heads, slide_ids

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


def read_slide(npz, slide: str, source: str) -> SlideAttention:
    """Attention (mean over heads) and coords of one slide from an open attention.npz."""
    att, coords = read_heads(npz, slide, source)
    return SlideAttention(att.mean(axis=0), coords, infer_patch_size(coords) or 0)


def percentile(x: np.ndarray) -> np.ndarray:
    """Each value's percentile rank within ``x`` in [0, 1] (ties share their mean rank; a single
    value or a constant map is 0.5 everywhere)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size <= 1:
        return np.full_like(x, 0.5)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size)
    uniq, inverse = np.unique(x, return_inverse=True)  # ties: mean rank of the group
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    if len(uniq) == 1:
        return np.full_like(x, 0.5)
    return (sums / counts)[inverse] / (x.size - 1)


def attention_raster(coords: np.ndarray, scores: np.ndarray, patch_l0: float,
                     shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """(h, w) map over a thumbnail of ``shape`` (level-0 px per thumbnail px = ``downsample`` x, y):
    each patch square holds its score (the larger where squares overlap), NaN off the patches."""
    h, w = shape
    dx, dy = downsample
    out = np.full((h, w), np.nan, dtype=np.float32)
    x0 = np.clip(np.floor(coords[:, 0] / dx).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] / dy).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_l0) / dx).astype(int), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_l0) / dy).astype(int), y0 + 1, h)
    for i in np.argsort(scores, kind="stable"):  # ascending: the higher score wins an overlap
        out[y0[i]:y1[i], x0[i]:x1[i]] = scores[i]
    return out


def overlay(rgb: np.ndarray, raster: np.ndarray, alpha: float = ALPHA, cmap: str = CMAP) -> np.ndarray:
    """The thumbnail with the raster's colours blended in where it is defined (one image to draw,
    so the figure stays small and fast to save). Colours come from a 256-entry table and only the
    covered pixels are blended: memory stays a few bytes per pixel."""
    lut = np.round(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    out = rgb.copy()
    on = ~np.isnan(raster)
    colour = lut[np.round(np.clip(raster[on], 0, 1) * 255).astype(np.uint8)]
    out[on] = np.round((1 - alpha) * rgb[on].astype(np.float32) + alpha * colour).astype(np.uint8)
    return out


CONTOUR_RGB = (20, 20, 20)


def draw_contours(rgb: np.ndarray, contours: list[list[list[float]]], downsample: tuple[float, float]) -> np.ndarray:
    """Tissue contours (rings of level-0 (x, y), as in the tissue GeoJSON) drawn on ``rgb``."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    dx, dy = downsample
    width = max(1, round(max(out.shape[:2]) / 800))
    for ring in contours:
        pts = np.round(np.asarray(ring, np.float64) / (dx, dy)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [pts], True, CONTOUR_RGB, width, lineType=cv2.LINE_AA)
    return out


def tissue_rings(geojson: dict) -> list[list[list[float]]]:
    """Every ring (exterior and holes) of a tissue GeoJSON FeatureCollection (docs/contracts.md)."""
    rings = []
    for feature in geojson.get("features", []):
        geometry = feature.get("geometry") or {}
        polygons = geometry.get("coordinates", [])
        if geometry.get("type") == "Polygon":
            polygons = [polygons]
        for polygon in polygons:
            rings.extend(polygon)
    return rings


def render_attention(rgb: np.ndarray, downsample: tuple[float, float], coords: np.ndarray, scores: np.ndarray,
                     patch_l0: float, contours: list | None = None) -> np.ndarray:
    """The one attention renderer: ``scores`` (one per patch) as percentiles within the slide,
    patch squares blended over ``rgb`` (level-0 px per image px = ``downsample``), tissue
    ``contours`` on top."""
    raster = attention_raster(coords, percentile(scores), max(patch_l0, 1), rgb.shape[:2], downsample)
    out = overlay(rgb, raster)
    return draw_contours(out, contours, downsample) if contours else out


def slide_image(path: str | Path, slide_mpp: float, out_mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide at ``out_mpp`` µm per pixel, read tile by tile from the level just finer than it
    (never the full-resolution raster), and level-0 px per output px (x, y)."""
    osr = open_slide(path)
    try:
        w0, h0 = osr.dimensions
        rgb = read_at_mpp(osr, slide_mpp, out_mpp)
    finally:
        osr.close()
    return rgb, (w0 / rgb.shape[1], h0 / rgb.shape[0])


MIN_MAP_MPP = 2.0  # finest slide-level map: 2 µm/px (a 100k px slide at 0.25 µm/px is 12,500 px wide)


def slide_heatmap(path: str | Path, slide_mpp: float, coords: np.ndarray, scores: np.ndarray, patch_l0: float,
                  out_mpp: float = 8.0, contours: list | None = None) -> np.ndarray:
    """A slide-level attention map at ``out_mpp`` µm/px (2 to any coarser), RGB."""
    if out_mpp < MIN_MAP_MPP:
        raise ValueError(f"attention map resolution {out_mpp} µm/px is finer than the {MIN_MAP_MPP} µm/px "
                         "e2epath renders; give a larger --map-mpp")
    rgb, ds = slide_image(path, slide_mpp, out_mpp)
    return render_attention(rgb, ds, coords, scores, patch_l0, contours)


def patch_montage(patches: list[np.ndarray], labels: list[str], cols: int = 8, cell: int = 128) -> np.ndarray:
    """Patches in a grid of ``cols`` columns at ``cell`` px, each with its label underneath."""
    import cv2

    rows = max(1, -(-len(patches) // cols))
    text_h = 16
    out = np.full((rows * (cell + text_h), cols * cell, 3), 255, np.uint8)
    for i, (patch, label) in enumerate(zip(patches, labels)):
        r, c = divmod(i, cols)
        y, x = r * (cell + text_h), c * cell
        out[y:y + cell, x:x + cell] = cv2.resize(patch, (cell, cell), interpolation=cv2.INTER_AREA)
        cv2.putText(out, label, (x + 2, y + cell + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_geojson(path: Path, coords: np.ndarray, patch_l0: float, measurements: dict[str, np.ndarray],
                  properties: dict | None = None) -> None:
    """The patches as a GeoJSON FeatureCollection that QuPath imports as detections: one square
    Polygon per patch in level-0 px, ``properties.measurements`` = {name: value} per patch (colour
    by any of them in QuPath: Measure → Show measurement maps). Written feature by feature to a
    temporary name, renamed when complete."""
    import json

    from e2epath.core.io import atomic_path

    names = list(measurements)
    values = np.column_stack([np.asarray(measurements[n], np.float64) for n in names]) if names else None
    side = float(patch_l0)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "properties": ' + json.dumps(properties or {}) + ', "features": [\n')
        for i, (x, y) in enumerate(np.asarray(coords, np.float64)):
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"objectType": "detection", "name": f"patch {i}",
                                      "measurements": {n: float(values[i, k]) for k, n in enumerate(names)}}}
            fh.write(("" if i == 0 else ",\n") + json.dumps(feature))
        fh.write("\n]}\n")


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
    for s in seeds.figure_rng(seed).permutation(common):  # seeded choice of the slides shown
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
            ax = axes[r, c]
            ax.imshow(render_attention(rgb, ds, att.coords, att.scores, att.patch_l0), interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{col_title}\n{key[1]}", fontsize=9)
            if c == 0:
                ax.set_ylabel(slide, fontsize=8)
            ax.set_xlabel(f"fold {f.fold}, {len(att.scores)} patches", fontsize=7)
    fig.colorbar(ScalarMappable(Normalize(0, 1), CMAP), ax=axes, shrink=0.6,
                 label="attention (percentile within the slide)")
    if title:
        fig.suptitle(title)
    return fig
