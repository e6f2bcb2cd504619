"""Tissue segmentation at a fixed low resolution (``seg_mpp``, default 8 µm/px).

The slide is read from the coarsest level still at least as fine as ``seg_mpp`` (in windows) and
area-resized to exactly ``seg_mpp``, so every size below is in microns and the result does not
depend on the scanner. Tissue = median-blurred HSV saturation above an Otsu threshold, minus
near-white glass and pen marks (strong green / blue hue, near-black, dark grey ink), closed morphologically;
pieces and holes smaller than the preset's areas (µm²) are dropped / filled.

Outputs (docs/contracts.md): mask PNG (0/255 at ``seg_mpp``), GeoJSON FeatureCollection in level-0 px
(one QuPath annotation Feature per tissue piece, holes as interior rings), and a QC thumbnail.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from e2epath.core import schema
from e2epath.core.io import read_records, write_bytes
from e2epath.preprocess import shards
from e2epath.slide import reader as sl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    """Segmentation parameters: ``seg_mpp`` from the config, the rest from a preset (`PRESETS`)."""

    seg_mpp: float                 # µm/px of the mask
    median_um: float = 40.0        # median blur size
    closing_um: float = 64.0       # morphological closing size
    min_area_um2: float = 1e5      # smaller tissue pieces are dropped
    min_hole_um2: float = 2e4      # smaller holes are filled
    sat_floor: int = 20            # saturation threshold never below this (glass noise)
    sat_cap: int = 60              # ... nor above this (slides that are almost all tissue)
    white_value: int = 220         # near-white glass: V ≥ this and S < white_sat
    white_sat: int = 25
    dark_value: int = 50           # near-black: ink, debris, slide edge
    ink_value: int = 110           # dark and greyish (V < ink_value, S < ink_sat): black ink laid over
    ink_sat: int = 110             # tissue, which blends to dark purple-grey, not to near-black
    pen_um: float = 16.0           # pen masks grow by this (ink edges blend into tissue)


# The config's `preprocess.tissue.preset`: what each preset changes from the field defaults above.
PRESETS: dict[str, dict[str, float]] = {
    "resection": {},
    "biopsy": {"median_um": 24.0, "closing_um": 24.0, "min_area_um2": 1e4, "min_hole_um2": 4e3},
}
# The settings a config may change on top of its preset (preprocess.tissue; the schema checks them).
OVERRIDES = tuple(f.name for f in fields(TissueParams) if f.name != "seg_mpp")
THUMB_PX = 1024  # longest side of the QC thumbnail


def tissue_params(preset: str, seg_mpp: float, **overrides: float) -> TissueParams:
    """The preset's parameters at ``seg_mpp``, with ``overrides`` (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tissue preset {preset!r}; valid: {', '.join(PRESETS)}")
    return TissueParams(seg_mpp=seg_mpp, **{**PRESETS[preset],
                                            **{k: v for k, v in overrides.items() if v is not None}})


def _odd(um: float, mpp: float) -> int:
    k = max(1, int(round(um / mpp)))
    return k if k % 2 else k + 1


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values`` (1-D); 0 when empty or constant."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    omega = np.cumsum(hist) / total
    mu = np.cumsum(hist * np.arange(256)) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = 0
    return int(np.argmax(between))


def excluded_pixels(hsv: np.ndarray, p: TissueParams) -> tuple[np.ndarray, np.ndarray]:
    """(glass, pen): near-white background and pen / near-black marks (pen already grown)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    glass = (v >= p.white_value) & (s < p.white_sat)
    green = (h >= 35) & (h <= 95) & (s >= 60)           # OpenCV hue 0-180: green ink
    blue = (h >= 100) & (h <= 125) & (s >= 170)         # saturated blue ink, not haematoxylin
    # stained tissue this dark is also saturated (haematoxylin: S > 120 at V 100-140)
    grey_ink = (v < p.ink_value) & (s < p.ink_sat)
    pen = (green | blue | grey_ink | (v < p.dark_value)).astype(np.uint8)
    if pen.any():
        k = _odd(2 * p.pen_um, p.seg_mpp)
        pen = cv2.dilate(pen, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return glass, pen.astype(bool)


def _filter_areas(mask: np.ndarray, min_area_px: float, min_hole_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    mask = np.where(keep[labels], 255, 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(255 - mask, connectivity=4)
    hh, ww = mask.shape
    x, y, w, h = (stats[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    inner = (x > 0) & (y > 0) & (x + w < ww) & (y + h < hh)
    fill = inner & (stats[:, cv2.CC_STAT_AREA] < min_hole_px)
    fill[0] = False  # label 0 of the inverted mask is the tissue itself
    mask[fill[labels]] = 255
    return mask


def segment(rgb: np.ndarray, p: TissueParams) -> np.ndarray:
    """Tissue mask (uint8 0/255) of ``rgb`` taken at ``p.seg_mpp`` µm/px."""
    blurred = cv2.medianBlur(rgb, _odd(p.median_um, p.seg_mpp))
    hsv = cv2.cvtColor(blurred, cv2.COLOR_RGB2HSV)
    glass, pen = excluded_pixels(hsv, p)
    valid = ~(glass | pen)
    sat = hsv[..., 1]
    if not valid.any():
        return np.zeros(rgb.shape[:2], np.uint8)
    thr = int(np.clip(otsu_threshold(sat[valid]), p.sat_floor, p.sat_cap))
    tissue = ((sat > thr) & valid).astype(np.uint8) * 255
    k = _odd(p.closing_um, p.seg_mpp)
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    tissue[pen] = 0
    px_area = p.seg_mpp ** 2
    return _filter_areas(tissue, p.min_area_um2 / px_area, p.min_hole_um2 / px_area)


def _ring(contour: np.ndarray, downsample: float, exterior: bool) -> list[list[float]]:
    pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) * downsample
    x, y = pts[:, 0], pts[:, 1]
    signed = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    if (signed > 0) != exterior:  # RFC 7946: exterior counter-clockwise, holes clockwise
        pts = pts[::-1]
    ring = [[round(float(a), 1), round(float(b), 1)] for a, b in pts]
    return ring + [ring[0]]


def mask_features(mask: np.ndarray, downsample: float, seg_mpp: float) -> list[dict[str, Any]]:
    """One GeoJSON Polygon Feature (QuPath annotation) per tissue piece, level-0 px, holes inside."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    feats = []
    if hierarchy is None:
        return feats
    hier = hierarchy[0]
    for i, c in enumerate(contours):
        if hier[i][3] != -1 or len(c) < 3:
            continue
        rings = [_ring(c, downsample, True)]
        child = hier[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(_ring(contours[child], downsample, False))
            child = hier[child][0]
        piece = np.zeros_like(mask)
        cv2.drawContours(piece, contours, i, 255, -1, hierarchy=hierarchy, maxLevel=1)
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 200, 255]},
                           "area_um2": float(np.count_nonzero(piece & mask)) * seg_mpp ** 2},
        })
    return feats


def qc_thumbnail(rgb: np.ndarray, mask: np.ndarray, title: str, size: int = 1024) -> np.ndarray:
    """RGB thumbnail (longest side ``size``) with tissue outlines (cyan) and holes (orange)."""
    scale = size / max(rgb.shape[:2])
    out_size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    thumb = cv2.resize(rgb, out_size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    big = cv2.resize(mask, out_size, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    for i, c in enumerate(contours):
        hole = hierarchy[0][i][3] != -1
        cv2.drawContours(thumb, [c], -1, (255, 140, 0) if hole else (0, 200, 255), 2)
    cv2.putText(thumb, title, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2, cv2.LINE_AA)
    return thumb


def failed_thumbnail(title: str, message: str, size: int = 512) -> np.ndarray:
    img = np.full((size // 2, size, 3), 200, np.uint8)
    cv2.putText(img, title, (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (180, 0, 0), 2, cv2.LINE_AA)
    for i in range(0, min(len(message), 6 * 60), 60):
        cv2.putText(img, message[i:i + 60], (8, 60 + i // 60 * 22), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return img


def _png(img: np.ndarray) -> bytes:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def segment_slide(qc: dict[str, Any], p: TissueParams) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(rgb at seg_mpp, mask, collection properties) for a slide whose QC is ok."""
    mds = p.seg_mpp / qc["mpp"]
    osr = sl.open_slide(qc["path"])
    try:
        rgb = sl.read_at_mpp(osr, qc["mpp"], p.seg_mpp)
    finally:
        osr.close()
    mask = segment(rgb, p)
    area = float(np.count_nonzero(mask)) * p.seg_mpp ** 2
    status = "ok" if area > 0 else "no_tissue"
    props = {"slide_id": qc["slide_id"], "status": status, "seg_mpp": p.seg_mpp, "mask_downsample": mds,
             "tissue_area_um2": area, "message": "" if area else "no tissue found"}
    return rgb, mask, props


def run(qc: dict[str, Any], p: TissueParams, mask_out: Path, geojson_out: Path, thumb_out: Path,
        preset: str, thumb_size: int = THUMB_PX) -> dict[str, Any]:
    """Segment one slide and write the three outputs; a bad slide gives status failed."""
    sid = qc["slide_id"]
    try:
        if qc.get("status") != "ok":
            raise sl.SlideError(f"slide QC failed: {qc.get('error')}")
        rgb, mask, props = segment_slide(qc, p)
        thumb = qc_thumbnail(rgb, mask, f"{sid}  {props['tissue_area_um2'] / 1e6:.2f} mm2", thumb_size)
        feats = mask_features(mask, props["mask_downsample"], p.seg_mpp)
    except sl.SlideError as e:
        msg = str(e)
        logger.error("%s: tissue segmentation failed: %s", sid, msg)
        mpp = qc.get("mpp")
        shape = (1, 1)
        if mpp and qc.get("width"):
            shape = (max(1, round(qc["height"] * mpp / p.seg_mpp)), max(1, round(qc["width"] * mpp / p.seg_mpp)))
        mask, feats, thumb = np.zeros(shape, np.uint8), [], failed_thumbnail(f"{sid}: FAILED", msg)
        props = {"slide_id": sid, "status": "failed", "seg_mpp": p.seg_mpp,
                 "mask_downsample": p.seg_mpp / mpp if mpp else None, "tissue_area_um2": 0.0, "message": msg}
    props.update(preset=preset, params=asdict(p))
    write_bytes(mask_out, _png(mask))
    write_bytes(thumb_out, _png(thumb))
    write_bytes(geojson_out, json.dumps({"type": "FeatureCollection", "properties": props, "features": feats}).encode())
    logger.info("%s: %s, %d pieces, %.3f mm² tissue (preset %s, seg %.3g µm/px, mask %dx%d)", sid, props["status"],
                len(feats), props["tissue_area_um2"] / 1e6, preset, p.seg_mpp, mask.shape[1], mask.shape[0])
    return props


OUTPUTS: shards.Outputs = {"mask_out": ("mask_dir", ".png"), "geojson_out": ("geojson_dir", ".geojson"),
                           "thumb_out": ("thumb_dir", ".png")}


def tissue_item(qc: dict[str, Any], params: TissueParams, preset: str, thumb_size: int,
                paths: dict[str, Path]) -> shards.Item:
    """One slide's segmentation, for a per-slide job or a shard; its record carries the output paths."""
    def work() -> dict[str, Any]:
        props = run(qc, params, paths["mask"], paths["geojson"], paths["thumb"], preset, thumb_size)
        return {**props, **{k: str(v) for k, v in paths.items()}}

    payload = {"step": "tissue", "params": asdict(params), "preset": preset, "thumb_size": thumb_size,
               "qc": qc.get("fingerprint")}
    return shards.Item(qc["slide_id"], payload, list(paths.values()), work)


def _main(argv: list[str] | None, shard: bool) -> int:
    p = argparse.ArgumentParser(prog="e2epath tissue" + ("_shard" if shard else ""), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=schema.arg_type("preprocess", "tissue", "preset"), required=True)
    p.add_argument("--seg-mpp", type=schema.arg_type("preprocess", "tissue", "seg_mpp"), required=True)
    p.add_argument("--thumb-size", type=int, default=THUMB_PX)
    for name in OVERRIDES:  # the config's preprocess.tissue settings: the preset's unless given
        p.add_argument("--" + name.replace("_", "-"), type=schema.arg_type("preprocess", "tissue", name), default=None,
                       help=f"change the preset's {name} (config preprocess.tissue.{name})")
    p.add_argument("--qc", required=True, type=Path, help="the slide's QC record, or the shard's QC table")
    shards.add_outputs(p, shard, OUTPUTS)
    a = p.parse_args(argv)
    params = tissue_params(a.preset, a.seg_mpp, **{k: getattr(a, k) for k in OVERRIDES})
    items = []
    for qc in read_records([a.qc]):
        paths = shards.output_paths(a, shard, OUTPUTS, qc["slide_id"])
        items.append(tissue_item(qc, params, a.preset, a.thumb_size,
                                 {k.removesuffix("_out"): v for k, v in paths.items()}))
    return shards.execute("tissue", items, a, shard)


def cli(argv: list[str] | None = None) -> int:
    """Segment one slide."""
    return _main(argv, shard=False)


def cli_shard(argv: list[str] | None = None) -> int:
    """Segment the slides of one shard (e2epath.shards); records carry the three output paths."""
    return _main(argv, shard=True)
