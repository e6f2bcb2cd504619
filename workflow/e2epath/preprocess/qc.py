"""Slide QC: can OpenSlide open and decode the slide, its pyramid, and its mpp with the source.

A missing, truncated, corrupt or non-slide file gives ``status: failed`` with OpenSlide's error
text; the step still exits 0 so that one bad slide does not stop the cohort.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
from pathlib import Path
from typing import Any

from .. import shards
from .. import slide as sl
from ..io import json_rows_to_tsv, write_json

logger = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
FIELDS = ("slide_id", "case_id", "path", "status", "vendor", "width", "height", "level_count",
          "level_downsamples", "level_dimensions", "mpp", "mpp_source", "objective_power", "error")
WINDOW = 2048


def valid_id(value: str) -> str:
    if not ID_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid id ([A-Za-z0-9._-]+)")
    return value


def check_readable(osr, window: int = WINDOW) -> None:
    """Decode the whole coarsest level (small) so that broken tile data fails here, not later."""
    level = osr.level_count - 1
    w, h = osr.level_dimensions[level]
    ds = osr.level_downsamples[level]
    for y in range(0, h, window):
        for x in range(0, w, window):
            sl.read_window(osr, level, round(x * ds), round(y * ds), min(window, w - x), min(window, h - y))


def slide_qc(slide_id: str, case_id: str, path: str | Path, sheet_mpp: float | None = None) -> dict[str, Any]:
    """The QC record of CONTRACTS.md for one slide; never raises for a bad slide."""
    rec: dict[str, Any] = {k: None for k in FIELDS}
    rec.update(slide_id=slide_id, case_id=case_id, path=str(Path(path).resolve()), status="failed")
    try:
        osr = sl.open_slide(rec["path"])
    except sl.SlideError as e:
        rec["error"] = str(e)
        return rec
    try:
        props = osr.properties
        rec.update(
            vendor=props.get("openslide.vendor"),
            width=osr.dimensions[0], height=osr.dimensions[1], level_count=osr.level_count,
            level_downsamples=[float(d) for d in osr.level_downsamples],
            level_dimensions=[list(d) for d in osr.level_dimensions],
            objective_power=sl.positive_float(props.get("openslide.objective-power")),
        )
        mpp, source = sl.slide_mpp(osr, sheet_mpp)
        rec.update(mpp=mpp, mpp_source=source)
        if sheet_mpp is not None and source != "sheet" and abs(mpp - sheet_mpp) > 0.1 * mpp:
            logger.warning("%s: sheet mpp %.4g disagrees with the slide's %.4g (%s); using the slide's",
                           slide_id, sheet_mpp, mpp, source)
        check_readable(osr)
        rec["status"] = "ok"
    except sl.SlideError as e:
        rec["error"] = str(e)
    finally:
        osr.close()
    return rec


def qc_to_file(slide_id: str, case_id: str, path: Path, sheet_mpp: float | None, out: Path) -> dict[str, Any]:
    """QC one slide, log the outcome, write its record to ``out``."""
    rec = slide_qc(slide_id, case_id, path, sheet_mpp)
    if rec["status"] == "ok":
        logger.info("%s: ok, %s, %dx%d, %d levels %s, mpp %.4f (%s)", slide_id, rec["vendor"], rec["width"],
                    rec["height"], rec["level_count"], rec["level_downsamples"], rec["mpp"], rec["mpp_source"])
    else:
        logger.error("%s: failed: %s", slide_id, rec["error"])
    write_json(out, rec)
    return rec


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e2epath qc", description=__doc__)
    p.add_argument("--slide-id", required=True, type=valid_id)
    p.add_argument("--case-id", required=True, type=valid_id)
    p.add_argument("--path", required=True, type=Path)
    p.add_argument("--sheet-mpp", type=float, default=None)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    qc_to_file(a.slide_id, a.case_id, a.path, a.sheet_mpp, a.out)
    return 0


def cli_shard(argv: list[str] | None = None) -> int:
    """QC the slides of one shard (e2epath.shards): aligned lists of paths, ids, cases, sheet mpps."""
    p = argparse.ArgumentParser(prog="e2epath qc_shard", description=cli_shard.__doc__)
    p.add_argument("--paths", nargs="+", required=True, type=Path)
    p.add_argument("--slide-ids", nargs="+", required=True, type=valid_id)
    p.add_argument("--case-ids", nargs="+", required=True, type=valid_id)
    p.add_argument("--sheet-mpps", nargs="+", required=True, type=float, help="nan: none in the sheet")
    p.add_argument("--qc-dir", required=True, type=Path, help="per-slide records {slide}.json")
    p.add_argument("--done-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    if not len(a.paths) == len(a.slide_ids) == len(a.case_ids) == len(a.sheet_mpps):
        p.error("--paths, --slide-ids, --case-ids and --sheet-mpps must have one value per slide")
    items = []
    for path, sid, case, mpp in zip(a.paths, a.slide_ids, a.case_ids, a.sheet_mpps):
        mpp = None if mpp != mpp else mpp  # NaN: the sheet gives none
        out = a.qc_dir / f"{sid}.json"
        payload = {"step": "qc", "slide": shards.file_stamp(path.resolve()), "case_id": case, "sheet_mpp": mpp}
        items.append(shards.Item(sid, payload, [out], functools.partial(qc_to_file, sid, case, path, mpp, out)))
    return shards.run("qc", items, a.done_dir, a.out)


def cli_table(argv: list[str] | None = None) -> int:
    """Aggregate QC JSONs into one TSV (one row per slide, lists JSON-encoded)."""
    p = argparse.ArgumentParser(prog="e2epath qc-table")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("jsons", nargs="*", type=Path)
    a = p.parse_args(argv)
    n = json_rows_to_tsv(a.jsons, FIELDS, a.out)
    logger.info("wrote %d slides to %s", n, a.out)
    return 0
