"""Benchmark: patch packing throughput (patches/s) on demo-like slides written with slidewriter.

(a) ours: ``patching.pack`` — coarsest adequate level, large windows sliced into patches, JPEG tiles
    decoded directly where that gives OpenSlide's pixels (``e2epath.slide.tiles``);
(a') the same packer with every read through OpenSlide (``E2EPATH_DIRECT_TILES=0``);
(b) naive: one ``read_region`` per patch at the same level + cv2.resize + imencode + LMDB put;
(c) level 0: one ``read_region`` per patch at level 0 + resize (what STAMP does), at 5x and 10x.
All three pack the same kept patches (same tissue mask) into a real LMDB. Then one process vs two
processes packing several slides. Prints a Markdown table with the ratios a/b, a/c and 2p/1p.

    PYTHONPATH=workflow python bench/preprocess.py [--repeats 2] [--scale 1.0]
    PYTHONPATH=workflow python bench/preprocess.py --quick    # slides at 1/4 size, best of 1: a smoke test
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import cv2
import lmdb
import numpy as np

from e2epath.preprocess import patching, qc, tissue
from e2epath.preprocess.store import LmdbWriter, encode_jpeg
from e2epath.slide import reader as sl
from e2epath.sources import slidewriter as sw

PATCH = 256
MAGS = (40, 20, 10, 5)


def he_slide(h: int, w: int, seed: int) -> np.ndarray:
    """Glass with 2-3 tissue blobs: eosin with smooth variation and dark nuclei."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    small = np.zeros((h // 64, w // 64), np.uint8)
    for _ in range(rng.integers(2, 4)):
        c = (int(rng.uniform(0.25, 0.75) * small.shape[1]), int(rng.uniform(0.25, 0.75) * small.shape[0]))
        axes = (int(rng.uniform(0.15, 0.3) * small.shape[1]), int(rng.uniform(0.15, 0.3) * small.shape[0]))
        cv2.ellipse(small, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST) > 0
    field = cv2.resize(rng.integers(0, 255, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8), (w, h),
                       interpolation=cv2.INTER_CUBIC).astype(np.int16) - 128
    tissue_rgb = np.clip(np.array([230, 150, 195], np.int16) + field // 3, 0, 255).astype(np.uint8)
    img[mask] = tissue_rgb[mask]
    ys, xs = np.nonzero(mask[::12, ::12])
    pick = rng.random(len(xs)) < 0.35
    for x, y in zip(xs[pick] * 12 + rng.integers(0, 12, pick.sum()), ys[pick] * 12 + rng.integers(0, 12, pick.sum())):
        cv2.circle(img, (int(x), int(y)), int(rng.integers(3, 7)), (90, 55, 145), -1)
    return img


def write_cohort(d: Path, scale: float) -> list[dict]:
    """Two Aperio-like 40x (1/4/16) and two generic 20x (1/2/4/8) slides, with QC + tissue masks."""
    specs = [("ap40a", "svs", 0.25, (9000, 12000)), ("ap40b", "svs", 0.2527, (8999, 11001)),
             ("gen20a", "tif", 0.5, (4500, 6000)), ("gen20b", "tif", 0.5, (4001, 5999))]
    slides = []
    for i, (sid, kind, mpp, (h, w)) in enumerate(specs):
        h, w = int(h * scale), int(w * scale)
        img = he_slide(h, w, seed=i)
        path = d / f"{sid}.{kind}"
        if kind == "svs":
            sw.write_aperio_svs(path, img, mpp=mpp, app_mag=40, downsamples=(1, 4, 16))
        else:
            sw.write_generic_tiff(path, img, mpp=mpp, downsamples=(1, 2, 4, 8))
        del img
        rec = qc.slide_qc(sid, sid, path)
        _, mask, props = tissue.segment_slide(rec, tissue.tissue_params("resection", seg_mpp=8.0))
        slides.append({"qc": rec, "mask": mask, "tissue": props})
    return slides


def kept(entry: dict, mag: int) -> tuple[patching.PatchPlan, np.ndarray, np.ndarray] | None:
    rec = entry["qc"]
    try:
        plan = patching.plan_patches(rec["level_downsamples"], rec["level_dimensions"], rec["mpp"], mag, PATCH,
                                     tolerance=0.1, allow_upsample=False)
    except sl.ResolutionUnavailable:
        return None
    frac = patching.tissue_fractions(entry["mask"], entry["tissue"]["mask_downsample"], plan)
    return plan, frac >= 0.5, frac


def run_ours(entry: dict, mag: int, out: Path, threads: int = 1) -> int:
    plan, keep, frac = kept(entry, mag)
    osr = sl.open_slide(entry["qc"]["path"])
    with LmdbWriter(out, keep.sum() * PATCH * PATCH * 3) as w:
        n = patching.pack(osr, plan, keep, frac, w, quality=90, threads=threads)
        w.close({"status": "ok"})
    return n


def run_per_patch(entry: dict, mag: int, out: Path, level0: bool) -> int:
    """Baselines (b) and (c): one read_region per patch, at the chosen level or at level 0."""
    plan, keep, frac = kept(entry, mag)
    osr = sl.open_slide(entry["qc"]["path"])
    level, size = (0, round(plan.read_px * plan.downsample)) if level0 else (plan.level, plan.read_px)
    env = lmdb.open(str(out), subdir=False, map_size=int(keep.sum()) * PATCH * PATCH * 3 + (64 << 20), lock=False)
    n = 0
    with env.begin(write=True) as txn:
        for row, col in zip(*np.nonzero(keep)):
            x, y = plan.origin(col, row)
            rgb = np.asarray(osr.read_region((int(x), int(y)), level, (size, size)))[..., :3]
            if size != PATCH:
                rgb = cv2.resize(rgb, (PATCH, PATCH), interpolation=cv2.INTER_AREA)
            txn.put(b"%08d" % n, encode_jpeg(rgb, 90))
            n += 1
    env.sync(True)  # the same durability as LmdbWriter
    env.close()
    return n


def openslide_only(fn):
    """``fn`` with the direct JPEG-tile path switched off: every read through OpenSlide."""
    return mock.patch.dict(os.environ, {"E2EPATH_DIRECT_TILES": "0"})(fn)


def timed(fn, repeats: int) -> tuple[int, float]:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return n, best


def _pack_all(args: tuple[dict, int, str]) -> int:
    entry, mag, out = args
    return run_ours(entry, mag, Path(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per cell")
    ap.add_argument("--scale", type=float, default=1.0, help="slide size factor")
    ap.add_argument("--threads", type=int, default=2, help="also time ours with this many threads")
    ap.add_argument("--quick", action="store_true", help="slides at 1/4 size, best of 1: a smoke test")
    a = ap.parse_args()
    if a.quick:
        a.scale, a.repeats = 0.25, 1
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        slides = write_cohort(d, a.scale)
        print(f"wrote + segmented {len(slides)} slides in {time.perf_counter() - t0:.1f} s")
        print("\n| mag | slides | patches | (a) ours p/s | ours, %d threads p/s | (a') ours, OpenSlide only p/s "
              "| (b) naive p/s | (c) level 0 p/s | a/b | a'/b | a/c |" % a.threads)
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for mag in MAGS:
            usable = [s for s in slides if kept(s, mag) is not None]
            totals = np.zeros(5)
            n_total = 0
            for s in usable:
                out = d / "bench.lmdb"
                n, ta = timed(lambda: run_ours(s, mag, out), a.repeats)
                _, tt = timed(lambda: run_ours(s, mag, out, a.threads), a.repeats)
                _, to = timed(openslide_only(lambda: run_ours(s, mag, out)), a.repeats)
                _, tb = timed(lambda: run_per_patch(s, mag, out, level0=False), a.repeats)
                tc = timed(lambda: run_per_patch(s, mag, out, level0=True), a.repeats)[1] if mag <= 10 else np.nan
                totals += (ta, tt, to, tb, tc)
                n_total += n
            pa, pt, po, pb, pc = n_total / totals
            c_cells = (f"{pc:.0f}", f"{pa / pc:.2f}") if mag <= 10 else ("—", "—")
            print(f"| {mag}x | {len(usable)} | {n_total} | {pa:.0f} | {pt:.0f} | {po:.0f} | {pb:.0f} | {c_cells[0]} "
                  f"| {pa / pb:.2f} | {po / pb:.2f} | {c_cells[1]} |")
        mag = 20
        jobs = [(s, mag, str(d / f"p{i}.lmdb")) for i, s in enumerate(slides * 2)]  # one writer per store
        t0 = time.perf_counter()
        n1 = sum(map(_pack_all, jobs))
        t1 = time.perf_counter() - t0
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_pack_all, jobs[:2]))  # start the workers before timing
            t0 = time.perf_counter()
            n2 = sum(pool.map(_pack_all, [(s, m, o + ".2") for s, m, o in jobs]))
            t2 = time.perf_counter() - t0
        assert n1 == n2
        print(f"\n| {mag}x, {len(jobs)} slide jobs ({n1} patches) | 1 process | 2 processes | 2p / 1p |")
        print("|---|---|---|---|")
        print(f"| patches/s | {n1 / t1:.0f} | {n2 / t2:.0f} | {t1 / t2:.2f} |")


if __name__ == "__main__":
    main()
