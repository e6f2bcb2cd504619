"""Cohort figures: a montage of the tissue-QC thumbnails, the patch counts per slide and
magnification, and a small summary table (slides by status, mpp source, vendor)."""
from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from e2epath.figures.common import FigureSkipped

logger = logging.getLogger(__name__)

SLIDE_COLUMNS = ("slide_id", "status", "vendor", "mpp_source", "error")
MANIFEST_COLUMNS = ("slide_id", "magnification", "status", "n_patches")
TILE_IN = 2.4
MAX_COLS = 10
GREY = 0.82


def read_table(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "magnification": str}, keep_default_na=False,
                     na_values=[""])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: {what} lacks column(s) {missing} (see docs/contracts.md)")
    return df


def mag_label(m) -> str:
    m = str(m)
    return m if m.endswith("x") else f"{float(m):g}x"


def patch_summary(manifest: pd.DataFrame) -> dict[str, str]:
    """slide → "5x:120 10x:480 20x:n/a" (n/a: that magnification is not ok for the slide)."""
    out: dict[str, list[tuple[float, str]]] = {}
    for r in manifest.itertuples():
        mag = mag_label(r.magnification)
        text = f"{mag}:{int(r.n_patches)}" if r.status == "ok" else f"{mag}:{r.status}"
        out.setdefault(str(r.slide_id), []).append((float(mag[:-1]), text))
    return {s: " ".join(t for _, t in sorted(v)) for s, v in out.items()}


def first_words(text, n: int = 12) -> str:
    words = str(text or "no error recorded").split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def plot_qc_montage(slides: pd.DataFrame, manifest: pd.DataFrame, thumbs: dict[str, Path]) -> Figure:
    """A grid of QC thumbnails (slide id, status, patches per magnification); failed slides and
    missing thumbnails are grey tiles that say why."""
    if slides.empty:
        raise FigureSkipped("slides.tsv has no rows")
    counts = patch_summary(manifest)
    n = len(slides)
    cols = min(MAX_COLS, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(TILE_IN * cols, TILE_IN * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    tiles = tqdm(list(slides.sort_values("slide_id").itertuples()), desc="QC montage", unit="slide")
    for ax, r in zip(axes, tiles):
        slide = str(r.slide_id)
        thumb = thumbs.get(slide)
        note = None
        if r.status != "ok":
            note = first_words(r.error)
        elif thumb is None:
            note = "no QC thumbnail"
            logger.warning("QC montage: no thumbnail for slide %s", slide)
        if note is None:
            ax.imshow(mpimg.imread(thumb))
        else:
            ax.imshow(np.full((3, 4, 3), GREY), extent=(0, 4, 0, 3))
            ax.text(2, 1.5, textwrap.fill(note, 28), ha="center", va="center", fontsize=6, wrap=True)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        color = "black" if r.status == "ok" else "firebrick"
        ax.set_title(f"{slide} [{r.status}]\n{counts.get(slide, 'no patches')}", fontsize=6.5, color=color)
    return fig


def plot_patch_counts(manifest: pd.DataFrame) -> Figure:
    """Histogram of patches per slide, one colour per magnification (ok stores only)."""
    ok = manifest[manifest["status"] == "ok"]
    if ok.empty:
        raise FigureSkipped("no slide × magnification with status ok in the manifest")
    skipped = len(manifest) - len(ok)
    if skipped:
        logger.info("patch counts: %d slide × magnification rows are not ok and are not counted", skipped)
    mags = sorted(ok["magnification"].unique(), key=lambda m: float(mag_label(m)[:-1]))
    data = [ok[ok["magnification"] == m]["n_patches"].to_numpy(float) for m in mags]
    lo = min(float(d.min()) for d in data)
    hi = max(float(d.max()) for d in data)
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    if lo > 0 and hi / lo > 20:  # magnifications differ ~4x per step in patch count: log bins
        bins = np.geomspace(lo, hi, 16)
        ax.set_xscale("log")
    else:
        bins = np.linspace(0, max(hi, 1.0), 16)
    ax.hist(data, bins=bins, label=[f"{mag_label(m)} (n={len(d)}, median {np.median(d):.0f})"
                                    for m, d in zip(mags, data)])
    ax.set(xlabel="patches per slide", ylabel="slides", title="Patches per slide and magnification")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


def cohort_summary(slides: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """``category, value, n_slides``: slides by status, mpp source and vendor, and slide ×
    magnification stores by status."""
    rows = []
    for col in ("status", "mpp_source", "vendor"):
        for value, n in slides[col].fillna("none").astype(str).value_counts().sort_index().items():
            rows.append((col, value, int(n)))
    for m in sorted(manifest["magnification"].unique(), key=lambda m: float(mag_label(m)[:-1])):
        sub = manifest[manifest["magnification"] == m]
        for value, n in sub["status"].astype(str).value_counts().sort_index().items():
            rows.append((f"patches_{mag_label(m)}", value, int(n)))
    return pd.DataFrame(rows, columns=["category", "value", "n_slides"])
