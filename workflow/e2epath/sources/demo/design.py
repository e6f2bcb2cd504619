"""The plan of a demo cohort — slides, cases, classes, formats, pen marks, sheet and labels; no pixels.

The demo cohort is small (24 slides, 18 cases by default) but exercises what real data does:

* formats — about half Aperio-SVS-like 40x (levels 1/4/16, ``thumbnail``/``label``/``macro``),
  the rest generic tiled TIFFs, mostly 20x (levels 1/2/4/8), two at 40x, and one without
  resolution tags whose mpp only the sample sheet knows (mpp source ``sheet``);
* odd sizes (e.g. 7999 × 6013) for edge handling, pen marks on about a third of the slides;
* a learnable label: slides of positive cases carry the signal (``e2epath.sources.demo.paint``),
  negatives have none. Survival times are shorter for positive cases.

The external cohort (``design_external``, ``plan_external``) has ids of its own (``EXT-S001``…,
``EXT-C001``…, 1–2 slides a case), slides from "another scanner" (``EXTERNAL_SCANNER``):
Aperio-SVS-like 40x at 0.2527 µm/px, generic TIFFs at 40x (0.243 µm/px), and again one slide (20x,
0.486 µm/px) without resolution tags whose mpp only the sheet knows.

``plan`` is cheap and returns the sheet rows before anything is written (the Snakefile calls it
at parse time). Everything follows from ``seed``: the same seed gives the same slides, a
byte-identical sheet and label tables.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from e2epath.sources.demo.scanners import DEMO_SCANNER, EXTERNAL_SCANNER, SCANNERS, Scanner
from e2epath.sources.sheets import SHEET_COLUMNS, label_columns

CLASSES = ("negative", "positive")  # sorted as strings: "positive" is the second class
SLIDE_UM = (2000.0, 1500.0)  # physical width, height of a slide at scale 1
PEN_COLOURS = {"green": (40, 150, 80), "blue": (40, 70, 180), "black": (45, 45, 55)}


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


def _design(n_slides: int, seed: int, scanner: Scanner, kind_of: Callable[[int], tuple[str, float, bool]],
            prefixes: tuple[str, str], max_per_case: int) -> list[SlideSpec]:
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


def sheet(specs: list[SlideSpec]) -> pd.DataFrame:
    """The sample sheet of ``specs`` (``SHEET_COLUMNS``; ``path`` relative to the sheet's folder)."""
    rows = [(s.slide_id, s.path, s.case_id, s.sheet_mpp) for s in specs]
    return pd.DataFrame(rows, columns=list(SHEET_COLUMNS)).astype({"mpp": float})


def plan(n_slides: int, seed: int) -> pd.DataFrame:
    """The sample sheet rows ``write`` will produce (``path`` relative to the sheet's folder)."""
    return sheet(design(n_slides, seed))


def plan_external(n_slides: int, seed: int) -> pd.DataFrame:
    """The sample sheet rows ``write_external`` will produce (``path`` relative to the sheet's folder)."""
    return sheet(design_external(n_slides, seed))


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
    return pd.DataFrame(rows, columns=label_columns("classification"))


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
    return pd.DataFrame(rows, columns=label_columns("survival"))
