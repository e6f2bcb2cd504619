"""Slide QC: can OpenSlide open and decode the slide, its pyramid, and its mpp with the source.

A missing, truncated, corrupt or non-slide file gives ``status: failed`` with OpenSlide's error
text; the step still exits 0 so that one bad slide does not stop the cohort.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
from pathlib import Path
from typing import Any

from e2epath.core.io import table_cli, write_json
from e2epath.core.vocabulary import check_id
from e2epath.preprocess import shards
from e2epath.slide import reader as sl

logger = logging.getLogger(__name__)

FIELDS = ("slide_id", "case_id", "path", "status", "vendor", "width", "height", "level_count",
          "level_downsamples", "level_dimensions", "mpp", "mpp_source", "objective_power", "error")
WINDOW = 2048
OUTPUTS: shards.Outputs = {"out": ("qc_dir", ".json")}  # the QC record (per shard: a folder of them)


def valid_id(value: str) -> str:
    try:
        return check_id(value, "id")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_readable(osr, window: int = WINDOW) -> None:
    """Decode the whole coarsest level (small) so that broken tile data fails here, not later."""
    level = osr.level_count - 1
    w, h = osr.level_dimensions[level]
    ds = osr.level_downsamples[level]
    for y in range(0, h, window):
        for x in range(0, w, window):
            sl.read_window(osr, level, round(x * ds), round(y * ds), min(window, w - x), min(window, h - y))


def slide_qc(slide_id: str, case_id: str, path: str | Path, sheet_mpp: float | None = None) -> dict[str, Any]:
    """The QC record of docs/contracts.md for one slide; never raises for a bad slide."""
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


def qc_item(slide_id: str, case_id: str, path: Path, sheet_mpp: float | None, out: Path) -> shards.Item:
    """One slide's QC, for a per-slide job or a shard; the fingerprint covers the slide file's stamp."""
    payload = {"step": "qc", "slide": shards.file_stamp(path.resolve()), "case_id": case_id, "sheet_mpp": sheet_mpp}
    return shards.Item(slide_id, payload, [out], functools.partial(qc_to_file, slide_id, case_id, path, sheet_mpp, out))


def _main(argv: list[str] | None, shard: bool) -> int:
    p = argparse.ArgumentParser(prog="e2epath qc" + ("_shard" if shard else ""), description=__doc__)
    n = "+" if shard else None  # a shard: aligned lists, one value per slide
    p.add_argument("--slide-id", nargs=n, required=True, type=valid_id)
    p.add_argument("--case-id", nargs=n, required=True, type=valid_id)
    p.add_argument("--path", nargs=n, required=True, type=Path)
    p.add_argument("--sheet-mpp", nargs=n, type=float, default=None,
                   help="the sample sheet's mpp (nan or left out: none)")
    shards.add_outputs(p, shard, OUTPUTS)
    a = p.parse_args(argv)
    ids, cases, paths = ([v] if not shard else v for v in (a.slide_id, a.case_id, a.path))
    mpps = a.sheet_mpp if shard else [a.sheet_mpp]
    mpps = [math.nan] * len(ids) if mpps is None else mpps
    if not len(ids) == len(cases) == len(paths) == len(mpps):
        p.error("--slide-id, --case-id, --path and --sheet-mpp must have one value per slide")
    items = []
    for sid, case, path, mpp in zip(ids, cases, paths, mpps):
        mpp = None if mpp is None or math.isnan(mpp) else mpp
        items.append(qc_item(sid, case, path, mpp, shards.output_paths(a, shard, OUTPUTS, sid)["out"]))
    return shards.execute("qc", items, a, shard)


def cli(argv: list[str] | None = None) -> int:
    """QC one slide."""
    return _main(argv, shard=False)


def cli_shard(argv: list[str] | None = None) -> int:
    """QC the slides of one shard (e2epath.shards)."""
    return _main(argv, shard=True)


def cli_table(argv: list[str] | None = None) -> int:
    """The QC table `results/slides.tsv`: one row per slide."""
    return table_cli(argv, "e2epath qc_table", FIELDS, "slide QC records")
