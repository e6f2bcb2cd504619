"""The built-in synthetic demo cohort: H&E-like pyramidal slides in real formats, a sheet, labels.

Written to disk here: ``write`` renders the slides ``plan`` promised and writes exactly its rows
(``write_external``: the external cohort, the same files), with the label tables and the ground
truth for attention maps, ``truth.tsv`` and ``truth/{slide}.png`` (the signal mask at ``TRUTH_MPP``
µm/px over the level-0 extent). A cohort is written into a temporary folder and then moved into
place, so a half-written cohort never looks finished. ``cli`` is ``python -m e2epath demo``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from e2epath.sources.demo.design import SlideSpec, design, design_external, sheet, subtype_labels, survival_labels
from e2epath.sources.demo.paint import TRUTH_MPP, RenderedSlide, render_slide, truth_mask
from e2epath.sources.slidewriter import write_aperio_svs, write_generic_tiff

logger = logging.getLogger(__name__)

OWN_ENTRIES = {"slides.tsv", "slides", "labels", "truth.tsv", "truth", "demo.json"}


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
            cv2.imwrite(str(tmp / "truth" / f"{spec.slide_id}.png"), truth_mask(slide))
            truth.append((spec.slide_id, spec.case_id, spec.kind, spec.mpp, int(spec.positive),
                          spec.pen or "", round(float(slide.signal.sum() / max(1, slide.tissue.sum())), 5)))
            del slide
        sheet(specs).to_csv(tmp / "slides.tsv", sep="\t", index=False)
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

