"""Patching + LMDB packing for one slide × magnification (docs/resolution.md).

Target mpp = 10 / magnification. Patches come from the coarsest level still at least as fine as
the target (mpp within ``tolerance`` counts as equal): a level px window of ``read_px`` =
patch_size · target / level mpp is area-downsampled (``cv2.INTER_AREA``) to ``patch_size``.
The grid is non-overlapping in level px; a patch is kept when its tissue fraction (from the
segmentation mask) is ≥ ``min_tissue``. Kept patches are read as large windows (one grid row,
up to ``window_px`` level px wide) and sliced, never one ``read_region`` per patch.

Outcomes (manifest ``status``): ``ok``; ``unavailable`` (finer than the scan, no upsampling
allowed); ``no_tissue``; ``failed`` (QC / segmentation failed, or a window could not be decoded:
the message names the level and window). Every outcome writes a store; a store that is not ok
holds only its meta.
"""
from __future__ import annotations

import argparse
import functools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from e2epath.core import schema
from e2epath.core.io import read_json, read_records, table_cli, write_json
from e2epath.core.vocabulary import MAGNIFICATIONS
from e2epath.preprocess import shards
from e2epath.preprocess.store import LmdbWriter, encode_jpeg, write_empty_store
from e2epath.slide import reader as sl

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("slide_id", "magnification", "status", "n_patches", "lmdb", "mpp", "read_level",
                   "read_downsample", "message")
WINDOW_PX = 4096  # widest window read at once, in level px (speed and memory only)
OUTPUTS: shards.Outputs = {"lmdb_out": ("lmdb_dir", ".lmdb"), "row_out": ("row_dir", ".json")}


@dataclass(frozen=True)
class PatchParams:
    """How a slide is patched (the config's `preprocess` section) and how fast (threads, window_px)."""

    magnification: int
    patch_size: int
    min_tissue: float
    tolerance: float         # mpp within this fraction counts as equal (config: mpp_tolerance)
    allow_upsample: bool
    jpeg_quality: int
    threads: int = 1         # windows decoded in parallel; speed only
    window_px: int = WINDOW_PX

    def fingerprint(self) -> dict[str, Any]:
        """What the stores depend on; threads and window_px change only how fast they are written."""
        return {k: getattr(self, k) for k in ("magnification", "patch_size", "min_tissue", "tolerance",
                                              "allow_upsample", "jpeg_quality")}


@dataclass(frozen=True)
class PatchPlan:
    """Where and how big to read: patch (col, row) covers level px [col·read_px, +read_px)."""

    level: int
    downsample: float          # level-0 px per level px
    read_mpp: float            # µm/px of the level read
    read_px: int               # level px per patch side
    patch_size: int            # output px per patch side
    cols: int
    rows: int

    @property
    def scale(self) -> float:
        return self.read_px / self.patch_size

    def origin(self, col: np.ndarray | int, row: np.ndarray | int) -> tuple[Any, Any]:
        """Level-0 top-left corner of patch (col, row)."""
        step = self.read_px * self.downsample
        return np.round(np.asarray(col) * step).astype(np.int64), np.round(np.asarray(row) * step).astype(np.int64)


def read_px(patch_size: int, level_mpp: float, target_mpp: float, tolerance: float) -> int:
    """Level px per patch side; mpp within ``tolerance`` is treated as equal (no resize)."""
    ratio = target_mpp / level_mpp
    if abs(ratio - 1.0) <= tolerance:
        return patch_size
    return max(1, int(round(patch_size * ratio)))


def plan_patches(level_downsamples: list[float], level_dimensions: list[list[int]], slide_mpp: float,
                 magnification: float, patch_size: int, tolerance: float, allow_upsample: bool) -> PatchPlan:
    """The read plan; raises :class:`slide.ResolutionUnavailable` for a magnification finer than the scan."""
    target = 10.0 / magnification
    level, ds = sl.choose_level(level_downsamples, slide_mpp, target, tolerance, allow_upsample)
    level_mpp = slide_mpp * ds
    r = read_px(patch_size, level_mpp, target, tolerance)
    lw, lh = level_dimensions[level]
    return PatchPlan(level, ds, level_mpp, r, patch_size, lw // r, lh // r)


def tissue_fractions(mask: np.ndarray, mask_downsample: float, plan: PatchPlan) -> np.ndarray:
    """(rows, cols) fraction of each grid patch covered by the mask (0/255 at ``mask_downsample``)."""
    integral = cv2.integral((mask > 0).astype(np.uint8), sdepth=cv2.CV_64F)
    mh, mw = mask.shape
    x0, y0 = plan.origin(np.arange(plan.cols + 1), np.arange(plan.rows + 1))
    xs = np.clip(np.round(x0 / mask_downsample).astype(np.int64), 0, mw)
    ys = np.clip(np.round(y0 / mask_downsample).astype(np.int64), 0, mh)
    xlo, xhi = xs[:-1], np.maximum(xs[1:], np.minimum(xs[:-1] + 1, mw))
    ylo, yhi = ys[:-1], np.maximum(ys[1:], np.minimum(ys[:-1] + 1, mh))
    s = (integral[yhi][:, xhi] - integral[ylo][:, xhi] - integral[yhi][:, xlo] + integral[ylo][:, xlo])
    area = np.outer(yhi - ylo, xhi - xlo).astype(np.float64)
    return np.divide(s, area, out=np.zeros_like(s), where=area > 0)


def windows(keep: np.ndarray, max_cols: int, max_gap: int = 2) -> Iterator[tuple[int, int, list[int]]]:
    """(row, first col, kept cols): one window per run of kept patches in a row.

    Columns are cut into strips of ``max_cols`` and each strip is read top to bottom, so that
    the tiles two patch rows share (when the read size is not a multiple of the tile size) are
    still in OpenSlide's tile cache, which then only has to hold one strip's band of tiles.
    """
    for c0 in range(0, keep.shape[1], max_cols):
        strip = keep[:, c0:c0 + max_cols]
        for row in np.flatnonzero(strip.any(axis=1)):
            cols = (np.flatnonzero(strip[row]) + c0).tolist()
            run = [cols[0]]
            for c in cols[1:]:
                if c - run[-1] > max_gap + 1:
                    yield int(row), run[0], run
                    run = [c]
                else:
                    run.append(c)
            yield int(row), run[0], run


def cache_bytes(plan: PatchPlan, window_px: int, tile_h: int, threads: int) -> int:
    """Tile cache that holds a strip's band of tiles plus the windows in flight (32 MiB-512 MiB)."""
    width = max(1, window_px // plan.read_px) * plan.read_px + 2 * tile_h
    band = width * (plan.read_px + 2 * tile_h) * 4
    return int(min(512 << 20, max(32 << 20, band * (2 + threads))))


def _pack_window(osr, plan: PatchPlan, row: int, first: int, cols: list[int], quality: int) -> list[bytes]:
    r = plan.read_px
    x0, y0 = plan.origin(first, row)
    win = sl.read_window(osr, plan.level, int(x0), int(y0), (cols[-1] - first + 1) * r, r)
    out = []
    for c in cols:
        patch = win[:, (c - first) * r:(c - first + 1) * r]
        if r != plan.patch_size:
            interp = cv2.INTER_AREA if r > plan.patch_size else cv2.INTER_CUBIC
            patch = cv2.resize(patch, (plan.patch_size, plan.patch_size), interpolation=interp)
        out.append(encode_jpeg(patch, quality))
    return out


def _packed_windows(osr, plan: PatchPlan, jobs: list, quality: int, threads: int) -> Iterator[tuple]:
    """(job, jpegs) in job order; with threads > 1, up to 2·threads windows are decoded ahead
    (OpenSlide releases the GIL while it decodes)."""
    if threads <= 1:
        for job in jobs:
            yield job, _pack_window(osr, plan, *job, quality)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        try:
            for job in jobs:
                pending.append((job, pool.submit(_pack_window, osr, plan, *job, quality)))
                if len(pending) >= 2 * threads:
                    job0, fut = pending.popleft()
                    yield job0, fut.result()
            while pending:
                job0, fut = pending.popleft()
                yield job0, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def pack(osr, plan: PatchPlan, keep: np.ndarray, fractions: np.ndarray, writer: LmdbWriter,
         quality: int, window_px: int = WINDOW_PX, threads: int = 1, desc: str = "") -> int:
    """Read the kept patches window by window into ``writer``; returns the number written."""
    max_cols = max(1, window_px // plan.read_px)
    sl.set_tile_cache(osr, cache_bytes(plan, window_px, sl.tile_size(osr, plan.level)[1], threads))
    jobs = list(windows(keep, max_cols))
    with tqdm(total=int(keep.sum()), desc=desc, unit="patch", mininterval=5, disable=None) as bar:
        for (row, _, cols), jpegs in _packed_windows(osr, plan, jobs, quality, threads):
            for c, jpeg in zip(cols, jpegs):
                x, y = plan.origin(c, row)
                writer.add(jpeg, (int(x), int(y)), float(fractions[row, c]))
            bar.update(len(cols))
    return len(writer)


def _mask_and_props(mask_path: Path, geojson_path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    props = read_json(geojson_path).get("properties", {})
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{mask_path}: cannot read the tissue mask PNG")
    return mask, props


def pack_slide(qc: dict[str, Any], mask: np.ndarray, tissue: dict[str, Any], params: PatchParams,
               lmdb_out: Path) -> dict[str, Any]:
    """Patch one slide at one magnification and write its store; returns the manifest row."""
    sid = qc["slide_id"]
    magnification, patch_size, min_tissue = params.magnification, params.patch_size, params.min_tissue
    jpeg_quality = params.jpeg_quality
    meta: dict[str, Any] = {"slide_id": sid, "magnification": magnification, "mpp": 10.0 / magnification,
                            "slide_mpp": qc.get("mpp"), "patch_size": patch_size, "n_patches": 0,
                            "read_level": None, "read_downsample": None, "read_mpp": None, "scale": None,
                            "jpeg_quality": jpeg_quality, "status": "failed", "message": ""}

    def finish(status: str, message: str, n: int = 0) -> dict[str, Any]:
        meta.update(status=status, message=message, n_patches=n)
        if status != "ok":
            write_empty_store(lmdb_out, meta)
        log = logger.info if status == "ok" else logger.warning
        log("%s @ %gx: %s (%d patches) %s", sid, magnification, status, n, message)
        return {"slide_id": sid, "magnification": magnification, "status": status, "n_patches": n,
                "lmdb": str(lmdb_out), "mpp": meta["mpp"], "read_level": meta["read_level"],
                "read_downsample": meta["read_downsample"], "message": message}

    if qc.get("status") != "ok":
        return finish("failed", f"slide QC failed: {qc.get('error')}")
    if tissue.get("status") == "failed":
        return finish("failed", f"tissue segmentation failed: {tissue.get('message')}")
    try:
        plan = plan_patches(qc["level_downsamples"], qc["level_dimensions"], qc["mpp"], magnification,
                            patch_size, params.tolerance, params.allow_upsample)
    except sl.ResolutionUnavailable as e:
        return finish("unavailable", f"{sid}: {e}")
    meta.update(read_level=plan.level, read_downsample=plan.downsample, read_mpp=plan.read_mpp, scale=plan.scale)
    frac = tissue_fractions(mask, float(tissue["mask_downsample"]), plan)
    keep = frac >= min_tissue
    n_keep = int(keep.sum())
    logger.info("%s @ %gx: target %.4g µm/px; slide %.4g µm/px (%s); level %d (downsample %.4g, %.4g µm/px); "
                "%d level px -> %d px per patch (scale %.4g); grid %dx%d = %d, kept %d, dropped %d with tissue < %.2f",
                sid, magnification, meta["mpp"], qc["mpp"], qc.get("mpp_source"), plan.level, plan.downsample,
                plan.read_mpp, plan.read_px, patch_size, plan.scale, plan.cols, plan.rows, keep.size, n_keep,
                keep.size - n_keep, min_tissue)
    if plan.scale < 1:
        logger.warning("%s @ %gx: upsampling %.3gx (allow_upsample is set)", sid, magnification, 1 / plan.scale)
    if n_keep == 0:
        return finish("no_tissue", f"no patch with tissue fraction >= {min_tissue}")
    # JPEG is far below raw size; raw size bounds the map with a wide margin.
    capacity = n_keep * (patch_size * patch_size * 3 + 4096)
    try:
        osr = sl.open_slide(qc["path"])
    except sl.SlideError as e:
        return finish("failed", str(e))
    try:
        with LmdbWriter(lmdb_out, capacity) as writer:
            n = pack(osr, plan, keep, frac, writer, jpeg_quality, params.window_px, params.threads,
                     desc=f"{sid} {magnification:g}x")
            meta.update(status="ok", message="", n_patches=n)
            writer.close(meta)
    except sl.SlideReadError as e:
        return finish("failed", str(e))
    finally:
        osr.close()
    return finish("ok", "", n)


def patch_to_files(qc: dict[str, Any], mask_path: Path, geojson_path: Path, params: PatchParams,
                   lmdb_out: Path, row_out: Path) -> dict[str, Any]:
    """Patch one slide into its store; write and return its manifest row."""
    mask, tissue = _mask_and_props(mask_path, geojson_path)
    row = pack_slide(qc, mask, tissue, params, lmdb_out)
    write_json(row_out, row)
    return row


def patch_item(qc: dict[str, Any], mask: Path, geojson: Path, params: PatchParams, lmdb_out: Path,
               row_out: Path, tissue_fingerprint: str | None = None) -> shards.Item:
    """One slide's patching, for a per-slide job or a shard."""
    payload = {"step": "patch", **params.fingerprint(), "qc": qc.get("fingerprint"), "tissue": tissue_fingerprint}
    work = functools.partial(patch_to_files, qc, mask, geojson, params, lmdb_out, row_out)
    return shards.Item(qc["slide_id"], payload, [lmdb_out, row_out], work)


def _main(argv: list[str] | None, shard: bool) -> int:
    p = argparse.ArgumentParser(prog="e2epath patch" + ("_shard" if shard else ""), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--magnification", required=True, type=int, choices=MAGNIFICATIONS)
    p.add_argument("--patch-size", required=True, type=schema.arg_type("preprocess", "patch_size"))
    p.add_argument("--min-tissue", required=True, type=schema.arg_type("preprocess", "min_tissue"))
    p.add_argument("--mpp-tolerance", required=True, type=schema.arg_type("preprocess", "mpp_tolerance"),
                   help="mpp within this fraction counts as equal")
    p.add_argument("--allow-upsample", action="store_true")
    p.add_argument("--jpeg-quality", required=True, type=schema.arg_type("preprocess", "jpeg_quality"))
    p.add_argument("--threads", required=True, type=int, help="windows decoded in parallel")
    p.add_argument("--window-px", type=int, default=WINDOW_PX, help="max window width in level px")
    p.add_argument("--qc", required=True, type=Path, help="the slide's QC record, or the shard's QC table")
    if shard:
        p.add_argument("--tissue", required=True, type=Path, help="the shard's tissue table")
    else:
        p.add_argument("--mask", required=True, type=Path)
        p.add_argument("--geojson", required=True, type=Path)
    shards.add_outputs(p, shard, OUTPUTS)
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be at least 1")
    params = PatchParams(a.magnification, a.patch_size, a.min_tissue, a.mpp_tolerance, a.allow_upsample,
                         a.jpeg_quality, a.threads, a.window_px)
    tissue = {r["slide_id"]: r for r in read_records([a.tissue])} if shard else {}
    items = []
    for qc in read_records([a.qc]):
        sid = qc["slide_id"]
        out = shards.output_paths(a, shard, OUTPUTS, sid)
        if not shard:
            seg = {"mask": a.mask, "geojson": a.geojson, "fingerprint": None}
        elif sid in tissue:
            seg = tissue[sid]
        else:
            p.error(f"{a.tissue} has no record of slide {sid}; rerun its tissue shard")
        items.append(patch_item(qc, Path(seg["mask"]), Path(seg["geojson"]), params, out["lmdb_out"], out["row_out"],
                                seg["fingerprint"]))
    return shards.execute("patch", items, a, shard)


def cli(argv: list[str] | None = None) -> int:
    """Patch one slide at one magnification."""
    return _main(argv, shard=False)


def cli_shard(argv: list[str] | None = None) -> int:
    """Patch the slides of one shard (e2epath.shards) at one magnification."""
    return _main(argv, shard=True)


def cli_manifest(argv: list[str] | None = None) -> int:
    """The manifest `results/patches/manifest.tsv`: one row per slide × magnification."""
    return table_cli(argv, "e2epath manifest", MANIFEST_FIELDS, "manifest rows")
