"""The built-in synthetic demo cohort: H&E-like pyramidal slides in real formats, a sheet, labels.

The cohort is small (24 slides, 18 cases by default) but exercises what real data does:

* formats — about half Aperio-SVS-like 40x (levels 1/4/16, ``thumbnail``/``label``/``macro``),
  the rest generic tiled TIFFs, mostly 20x (levels 1/2/4/8), two at 40x, and one without
  resolution tags whose mpp only the sample sheet knows (mpp source ``sheet``);
* odd sizes (e.g. 7999 × 6013) for edge handling, 2–4 irregular tissue pieces with lumens,
  pen marks on about a third of the slides;
* a learnable label: slides of positive cases carry a few small regions (≤ 10 % of the tissue)
  of crowded, large, dark-purple nuclei on lavender cytoplasm; negatives have none. The regions
  are small so that mean pooling struggles and attention pooling wins. Survival times are
  shorter for positive cases.

``plan`` is cheap and returns the sheet rows before anything is written (the Snakefile calls it
at parse time); ``write`` renders the slides and writes exactly those rows. Everything follows
from ``seed``: the same seed gives a byte-identical sheet and label tables and identical pixels.
Ground truth for attention maps goes to ``truth.tsv`` and ``truth/{slide}.png`` (the signal mask
at ``TRUTH_MPP`` µm/px over the level-0 extent).

A second, small *external* cohort (``design_external``, ``plan_external``, ``write_external``;
``python -m e2epath demo --external``) demonstrates external validation — train on the demo
cohort, test on this one, as TCGA → CPTAC. Same files, label columns and signal (so that a model
trained on the demo can transfer), but ids of its own (``EXT-S001``…, ``EXT-C001``…, 1–2 slides
a case) and "another scanner" (``EXTERNAL_SCANNER``): another H&E (hematoxylin bluer and darker,
eosin paler and pinker, a cooler background), Aperio-SVS-like 40x at 0.2527 µm/px with levels
1/2/8, generic TIFFs at 40x (0.243 µm/px) with levels 1/3/9, JPEG quality 80, and again one slide
(20x, 0.486 µm/px) without resolution tags whose mpp only the sheet knows. Its random streams are
its own, so it shares no slide with the demo cohort even at the same seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from e2epath.sources.slidewriter import write_aperio_svs, write_generic_tiff

logger = logging.getLogger(__name__)

SHEET_COLUMNS = ["slide_id", "path", "case_id", "mpp"]
CLASSES = ("negative", "positive")  # sorted as strings: "positive" is the second class
SLIDE_UM = (2000.0, 1500.0)  # physical width, height of a slide at scale 1
CANVAS_MPP = 0.5  # µm/px the tissue is painted at; 40x slides are upsampled from it
MASK_MPP = 2.0  # µm/px of the coarse geometry (tissue pieces, lumens)
TRUTH_MPP = 4.0  # µm/px of the ground-truth signal masks written to truth/
SIGNAL_BUDGET = 0.08  # planned signal area / tissue area; stays under the promised 10 %
OWN_ENTRIES = {"slides.tsv", "slides", "labels", "truth.tsv", "truth", "demo.json"}

BACKGROUND = 242.0
EOSIN = np.array([234.0, 158.0, 196.0])  # stroma
HEMATOXYLIN = np.array([92.0, 58.0, 148.0])  # ordinary nuclei
TUMOUR_CYTOPLASM = np.array([196.0, 148.0, 214.0])  # lavender
TUMOUR_NUCLEI = np.array([48.0, 18.0, 92.0])  # very dark purple
PEN_COLOURS = {"green": (40, 150, 80), "blue": (40, 70, 180), "black": (45, 45, 55)}


@dataclass(frozen=True, eq=False)
class Stain:
    """The colours (RGB, 0–255) one lab's H&E shows through one scanner's optics."""

    background: np.ndarray  # glass
    eosin: np.ndarray  # stroma
    hematoxylin: np.ndarray  # ordinary nuclei
    tumour_cytoplasm: np.ndarray  # under the signal's nuclei
    tumour_nuclei: np.ndarray  # the signal's crowded large nuclei


DEMO_STAIN = Stain(np.full(3, BACKGROUND), EOSIN, HEMATOXYLIN, TUMOUR_CYTOPLASM, TUMOUR_NUCLEI)
# Another lab and scanner: hematoxylin bluer and darker, eosin paler and pinker, cooler glass; the
# signal stays what it is (crowded, large, dark blue-purple nuclei on lavender), only shifted.
EXTERNAL_STAIN = Stain(
    background=np.array([238.0, 239.0, 244.0]),
    eosin=np.array([244.0, 172.0, 190.0]),
    hematoxylin=np.array([62.0, 54.0, 156.0]),
    tumour_cytoplasm=np.array([186.0, 150.0, 222.0]),
    tumour_nuclei=np.array([30.0, 20.0, 96.0]),
)


@dataclass(frozen=True)
class Scanner:
    """What a cohort's scanner decides: stain colours, pyramid layouts, JPEG quality.

    ``stream`` offsets the cohort's random streams (0: the demo cohort's), so two cohorts with
    the same seed still get different cases, labels and pixels.
    """

    name: str
    stain: Stain
    svs_downsamples: tuple[int, ...]
    tiff_downsamples: tuple[int, ...]
    jpeg_quality: int
    stream: int


DEMO_SCANNER = Scanner("demo", DEMO_STAIN, (1, 4, 16), (1, 2, 4, 8), 90, 0)
EXTERNAL_SCANNER = Scanner("external", EXTERNAL_STAIN, (1, 2, 8), (1, 3, 9), 80, 10)
SCANNERS = {s.name: s for s in (DEMO_SCANNER, EXTERNAL_SCANNER)}


@dataclass(frozen=True)
class SlideSpec:
    """Everything ``plan`` decides about one slide; the pixels follow from it and the seed."""

    index: int
    slide_id: str
    case_id: str
    kind: str  # "svs" or "tiff"
    mpp: float  # true level-0 µm/px
    write_resolution: bool  # False: no TIFF resolution tags, the sheet carries the mpp
    positive: bool
    pen: str | None  # colour name of the pen mark, or None
    odd_size: bool
    scanner_name: str = DEMO_SCANNER.name  # a key of SCANNERS

    @property
    def scanner(self) -> Scanner:
        return SCANNERS[self.scanner_name]

    @property
    def path(self) -> str:
        return f"slides/{self.slide_id}.{'svs' if self.kind == 'svs' else 'tif'}"

    @property
    def sheet_mpp(self) -> float:
        return float("nan") if self.write_resolution else self.mpp

    @property
    def downsamples(self) -> tuple[int, ...]:
        return self.scanner.svs_downsamples if self.kind == "svs" else self.scanner.tiff_downsamples

    def size(self, scale: float = 1.0) -> tuple[int, int]:
        """Level-0 (width, height) in pixels; odd-sized slides are off by a few pixels."""
        w = round(SLIDE_UM[0] * scale / self.mpp)
        h = round(SLIDE_UM[1] * scale / self.mpp)
        return (w - 1, h + 13) if self.odd_size else (w, h)


@dataclass
class RenderedSlide:
    """Level-0 pixels plus the generator's own masks (at ``mask_mpp`` µm/px)."""

    rgb: np.ndarray  # H × W × 3 uint8, level 0
    tissue: np.ndarray  # bool, tissue after lumens were cut out
    signal: np.ndarray  # bool, the positive texture (always inside tissue)
    mask_mpp: float


def _slide_kind(i: int) -> tuple[str, float, bool]:
    """Format, mpp and resolution tags of slide ``i``.

    Even slides are Aperio 40x; odd ones generic TIFF at 20x, except slides 6, 18, 30, … at 40x
    and slide 4, which has no resolution tags (its mpp comes from the sheet).
    """
    if i % 2 == 0:
        return "svs", 0.25, True
    if i == 3:
        return "tiff", 0.5, False  # the one slide whose mpp only the sheet knows
    if i % 12 == 5:
        return "tiff", 0.25, True
    return "tiff", 0.5, True


def _external_kind(i: int) -> tuple[str, float, bool]:
    """Format, mpp and resolution tags of external slide ``i``.

    Even slides are Aperio 40x at 0.2527 µm/px, odd ones generic TIFF 40x at 0.243 µm/px, except
    slide 2 (``EXT-S002``), a 20x generic TIFF (0.486 µm/px) without resolution tags: the sheet
    has its mpp.
    """
    if i % 2 == 0:
        return "svs", 0.2527, True
    if i == 1:
        return "tiff", 0.486, False
    return "tiff", 0.243, True


def _check_n_slides(n_slides: int) -> None:
    if not 1 <= n_slides <= 999:
        raise ValueError(f"n_slides must be between 1 and 999, got {n_slides}")


def _cases(rng: np.random.Generator, n_slides: int, max_per_case: int) -> tuple[np.ndarray, set[int]]:
    """Case (0-based) of every slide and the slides showing the signal.

    About 0.75 cases a slide, at most ``max_per_case`` slides a case; half the cases (rounded
    down) are positive whenever there are two or more.
    """
    n_cases = max(1, int(n_slides * 0.75 + 0.5))
    # every case gets one slide, the rest go to random cases
    counts = np.ones(n_cases, int)
    for _ in range(n_slides - n_cases):
        open_ = np.flatnonzero(counts < max_per_case)
        counts[rng.choice(open_)] += 1
    case_of_slide = rng.permutation(np.repeat(np.arange(n_cases), counts))
    positive_cases = set(rng.permutation(n_cases)[: n_cases // 2].tolist()) if n_cases > 1 else set()
    # a positive case shows the signal on at least one slide, not necessarily all of them
    positive_slides: set[int] = set()
    for c in sorted(positive_cases):
        slides = np.flatnonzero(case_of_slide == c)
        keep = slides if len(slides) == 1 or rng.random() < 0.5 else slides[rng.permutation(len(slides))[:-1]]
        positive_slides.update(keep.tolist())
    return case_of_slide, positive_slides


def _pen_colours(rng: np.random.Generator, n_slides: int) -> dict[int, str]:
    """Slide → pen colour for about a third of the slides."""
    pen_order = rng.permutation(n_slides)[: round(n_slides / 3)]
    return {int(i): list(PEN_COLOURS)[k % len(PEN_COLOURS)] for k, i in enumerate(pen_order)}


def design(n_slides: int, seed: int) -> list[SlideSpec]:
    """Assign slides to cases, cases to classes, formats and pen marks — no pixels."""
    return _design(n_slides, seed, DEMO_SCANNER, _slide_kind, ("DEMO-S", "CASE-"), max_per_case=3)


def design_external(n_slides: int, seed: int) -> list[SlideSpec]:
    """The external cohort's slides ("another scanner"): ids ``EXT-S…``/``EXT-C…``, 1–2 slides a case.

    Both classes are present whenever ``n_slides`` ≥ 2; no pixels.
    """
    return _design(n_slides, seed, EXTERNAL_SCANNER, _external_kind, ("EXT-S", "EXT-C"), max_per_case=2)


def _design(n_slides: int, seed: int, scanner: Scanner, kind_of, prefixes: tuple[str, str],
            max_per_case: int) -> list[SlideSpec]:
    """A cohort's slides from its scanner's random stream: cases, classes, formats (``kind_of``), pens."""
    _check_n_slides(n_slides)
    rng = np.random.default_rng([seed, 1 + scanner.stream])
    case_of_slide, positive_slides = _cases(rng, n_slides, max_per_case=max_per_case)
    pen_colour = _pen_colours(rng, n_slides)
    specs = []
    for i in range(n_slides):
        kind, mpp, res = kind_of(i)
        specs.append(SlideSpec(
            index=i, slide_id=f"{prefixes[0]}{i + 1:03d}", case_id=f"{prefixes[1]}{case_of_slide[i] + 1:03d}",
            kind=kind, mpp=mpp, write_resolution=res, positive=i in positive_slides,
            pen=pen_colour.get(i), odd_size=i % 3 == 1, scanner_name=scanner.name))
    return specs


def _sheet(specs: list[SlideSpec]) -> pd.DataFrame:
    rows = [(s.slide_id, s.path, s.case_id, s.sheet_mpp) for s in specs]
    return pd.DataFrame(rows, columns=SHEET_COLUMNS).astype({"mpp": float})


def plan(n_slides: int, seed: int) -> pd.DataFrame:
    """The sample sheet rows ``write`` will produce (``path`` relative to the sheet's folder)."""
    return _sheet(design(n_slides, seed))


def plan_external(n_slides: int, seed: int) -> pd.DataFrame:
    """The sample sheet rows ``write_external`` will produce (``path`` relative to the sheet's folder)."""
    return _sheet(design_external(n_slides, seed))


def _stream(specs: list[SlideSpec]) -> int:
    """The random-stream offset of the cohort ``specs`` belong to (one cohort at a time)."""
    streams = {s.scanner.stream for s in specs}
    if len(streams) > 1:
        raise ValueError("slides of more than one cohort")
    return streams.pop() if streams else DEMO_SCANNER.stream


def subtype_labels(specs: list[SlideSpec]) -> pd.DataFrame:
    """``case_id,label``: a case is positive when any of its slides is."""
    pos: dict[str, bool] = {}
    for s in specs:
        pos[s.case_id] = pos.get(s.case_id, False) or s.positive
    rows = [(c, CLASSES[int(p)]) for c, p in sorted(pos.items())]
    return pd.DataFrame(rows, columns=["case_id", "label"])


def survival_labels(specs: list[SlideSpec], seed: int) -> pd.DataFrame:
    """``case_id,time,event``: months; positive cases die sooner, about 70 % of events observed."""
    rng = np.random.default_rng([seed, 2 + _stream(specs)])
    rows = []
    for case_id, label in subtype_labels(specs).itertuples(index=False):
        t = rng.exponential(12.0 if label == "positive" else 40.0)
        event = int(rng.random() < 0.7)
        if not event:
            t *= rng.uniform(0.2, 0.9)  # censored before the event would have happened
        rows.append((case_id, round(max(t, 0.5), 2), event))
    return pd.DataFrame(rows, columns=["case_id", "time", "event"])


# --- painting -----------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: random values every ``cell`` pixels, cubic upsampled."""
    h, w = shape
    small = rng.standard_normal((max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)))
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, centre, axes, wobble: float, n: int = 96) -> np.ndarray:
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


# --- writing ------------------------------------------------------------------------------------

def _label_image(spec: SlideSpec) -> np.ndarray:
    """The slide's paper label, as a scanner photographs it."""
    img = np.full((200, 200, 3), 245, np.uint8)
    cv2.putText(img, "E2EPATH", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (20, 20, 20), 2)
    cv2.putText(img, spec.slide_id, (12, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (20, 20, 20), 2)
    cv2.putText(img, spec.case_id, (12, 170), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (20, 20, 20), 2)
    return img


def write_slide(spec: SlideSpec, path: Path, slide: RenderedSlide) -> None:
    """Write ``slide`` in the format ``spec`` asks for."""
    if spec.kind == "svs":
        write_aperio_svs(path, slide.rgb, mpp=spec.mpp, app_mag=round(10 / spec.mpp),
                         downsamples=spec.downsamples, quality=spec.scanner.jpeg_quality,
                         label=_label_image(spec))
    else:
        write_generic_tiff(path, slide.rgb, mpp=spec.mpp if spec.write_resolution else None,
                           downsamples=spec.downsamples, quality=spec.scanner.jpeg_quality)


def _truth_mask(slide: RenderedSlide) -> np.ndarray:
    """The signal mask at ``TRUTH_MPP`` over the level-0 extent, uint8 0/255."""
    h, w = slide.signal.shape
    f = slide.mask_mpp / TRUTH_MPP
    small = cv2.resize(slide.signal.astype(np.float32), (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
    return np.where(small > 0.5, 255, 0).astype(np.uint8)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an old demo there is replaced, anything else refused."""
    if out_dir.exists():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise FileExistsError(
                f"{out_dir} exists and holds {foreign}, which the demo writer did not make; "
                "choose another --out or move them away")
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _check_scale(scale: float) -> None:
    if not 0.05 <= scale <= 4:
        raise ValueError(f"scale must be between 0.05 and 4 (physical slide size factor), got {scale}")


def _write_cohort(out_dir: Path, specs: list[SlideSpec], seed: int, scale: float, meta: dict) -> None:
    """Render and write ``specs`` with their sheet, labels and ground truth into a temporary folder,
    then move it to ``out_dir`` (so a half-written cohort never looks finished)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    labels = subtype_labels(specs)
    logger.info("%s cohort: %d slides, %d cases (%d positive), seed %d, scale %g -> %s",
                specs[0].scanner_name, len(specs), len(labels), (labels.label == "positive").sum(), seed,
                scale, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent))
    try:
        for sub in ("slides", "labels", "truth"):
            (tmp / sub).mkdir()
        truth = []
        for spec in tqdm(specs, desc=f"{specs[0].scanner_name} slides", unit="slide"):
            slide = render_slide(spec, seed, scale)
            write_slide(spec, tmp / spec.path, slide)
            cv2.imwrite(str(tmp / "truth" / f"{spec.slide_id}.png"), _truth_mask(slide))
            truth.append((spec.slide_id, spec.case_id, spec.kind, spec.mpp, int(spec.positive),
                          spec.pen or "", round(float(slide.signal.sum() / max(1, slide.tissue.sum())), 5)))
            del slide
        _sheet(specs).to_csv(tmp / "slides.tsv", sep="\t", index=False)
        labels.to_csv(tmp / "labels" / "subtype.csv", index=False)
        survival_labels(specs, seed).to_csv(tmp / "labels" / "survival.csv", index=False)
        pd.DataFrame(truth, columns=["slide_id", "case_id", "format", "mpp", "positive", "pen_mark",
                                     "signal_fraction_of_tissue"]).to_csv(tmp / "truth.tsv", sep="\t", index=False)
        (tmp / "demo.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write(out_dir: str | Path, n_slides: int, seed: int, scale: float = 1.0) -> None:
    """Write the demo cohort to ``out_dir``: slides.tsv, slides/, labels/, truth.tsv, truth/.

    ``scale`` shrinks the physical slide size (tests use small slides); the sheet is the same.
    """
    _check_scale(scale)
    _write_cohort(Path(out_dir), design(n_slides, seed), seed, scale,
                  {"n_slides": n_slides, "seed": seed, "scale": scale, "truth_mpp": TRUTH_MPP})


def write_external(out_dir: str | Path, n_slides: int, seed: int, scale: float = 1.0) -> None:
    """Write the external cohort ("another scanner") to ``out_dir``, the same files as ``write``."""
    _check_scale(scale)
    _write_cohort(Path(out_dir), design_external(n_slides, seed), seed, scale,
                  {"cohort": "external", "n_slides": n_slides, "seed": seed, "scale": scale,
                   "truth_mpp": TRUTH_MPP})


def cli(argv: list[str] | None = None) -> int:
    """``python -m e2epath demo [--external] --out resources/demo --n-slides 24 --seed 0 --scale 1``."""
    ap = argparse.ArgumentParser(prog="e2epath demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="cohort folder to write")
    ap.add_argument("--n-slides", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--scale", type=float, required=True, help="physical slide size factor (tests: < 1)")
    ap.add_argument("--external", action="store_true",
                    help="write the small external cohort (another scanner, ids EXT-…) instead")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    writer = write_external if args.external else write
    writer(args.out, n_slides=args.n_slides, seed=args.seed, scale=args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
