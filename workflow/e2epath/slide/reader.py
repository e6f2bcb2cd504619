"""The only module that reads slides (through OpenSlide, and direct JPEG tiles in `tiles`): open,
microns per pixel and its source, level choice, and windowed reads that fail loudly.

Microns per pixel, in this order (docs/resolution.md):

1. ``openslide.mpp-x`` — OpenSlide already derives it from the vendor keys (``aperio.MPP``,
   Hamamatsu, MIRAX, Philips, Ventana, ...) and, since OpenSlide 4, from the TIFF resolution of
   generic TIFFs; whatever OpenSlide reports is recorded as source ``openslide``.
2. ``tiff.XResolution`` with ``tiff.ResolutionUnit`` centimeter / inch, for formats where OpenSlide
   does not use the TIFF resolution itself (e.g. an Aperio file whose description has no ``MPP``);
   only a value computed here is recorded as ``tiff``.
3. ``openslide.objective-power`` → 10 / power (``objective-power``).
4. the sample sheet's ``mpp`` column (``sheet``).

Otherwise :class:`MppError` names the keys looked at and says to add an ``mpp`` column.
"""
from __future__ import annotations

import ctypes
import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import openslide
from openslide import lowlevel

from e2epath.slide import tiles

logger = logging.getLogger(__name__)

# Anything outside this range is a placeholder (e.g. a 72 dpi TIFF default), not a scan.
PLAUSIBLE_MPP = (0.05, 20.0)
# `read_at_mpp`: mpp within this fraction counts as equal when choosing the level to read from (the
# image is then resized to exactly the wanted mpp, so this only decides which level is read).
LEVEL_TOLERANCE = 0.1
MPP_KEYS = ("openslide.mpp-x", "tiff.XResolution + tiff.ResolutionUnit", "openslide.objective-power")


class SlideError(Exception):
    """A slide that cannot be opened or used; the message names the slide."""


class MppError(SlideError):
    """No microns-per-pixel value from the slide nor from the sample sheet."""


class ResolutionUnavailable(SlideError):
    """The requested magnification is finer than the scan and upsampling is not allowed."""


class SlideReadError(SlideError):
    """Decoding a window failed; carries the slide, level and window (level-0 px)."""

    def __init__(self, slide: str, level: int, window: tuple[int, int, int, int], reason: str):
        self.slide, self.level, self.window, self.reason = slide, level, window, reason
        x, y, w, h = window
        super().__init__(
            f"{slide}: cannot decode level {level} window x={x} y={y} w={w} h={h} "
            f"(level-0 px): {reason}"
        )


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide; the error names the file and says why."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except lowlevel.OpenSlideUnsupportedFormatError as e:
        raise SlideError(f"{path}: not a slide format OpenSlide can read ({e or 'unsupported format'})") from e
    except (lowlevel.OpenSlideError, OSError) as e:
        raise SlideError(f"{path}: OpenSlide cannot open it: {e}") from e


def set_tile_cache(osr: openslide.OpenSlide, nbytes: int) -> None:
    """Give ``osr`` its own decoded-tile cache of ``nbytes`` (OpenSlide's default is 32 MiB)."""
    osr.set_cache(openslide.OpenSlideCache(int(nbytes)))


def tile_size(osr: openslide.AbstractSlide, level: int) -> tuple[int, int]:
    """(width, height) of the level's stored tiles; 256 when the format does not say."""
    props = osr.properties
    return (int(props.get(f"openslide.level[{level}].tile-width", 256)),
            int(props.get(f"openslide.level[{level}].tile-height", 256)))


def slide_name(osr: openslide.AbstractSlide) -> str:
    return str(getattr(osr, "_filename", None) or repr(osr))


def positive_float(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _plausible(mpp: float | None, source: str) -> float | None:
    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        logger.warning("ignoring implausible mpp %.4g from %s", mpp, source)
        return None
    return mpp


def _tiff_mpp(props: Mapping[str, str]) -> float | None:
    res = positive_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if res is None or um_per_unit is None:
        return None
    return um_per_unit / res


def slide_mpp(osr: openslide.AbstractSlide | Mapping[str, str],
              sheet_mpp: float | None = None) -> tuple[float, str]:
    """Microns per pixel at level 0 and where it came from (see the module docstring)."""
    props = getattr(osr, "properties", osr)
    mpp = _plausible(positive_float(props.get("openslide.mpp-x")), "openslide.mpp-x")
    if mpp is not None:
        return mpp, "openslide"
    mpp = _plausible(_tiff_mpp(props), "tiff.XResolution")
    if mpp is not None:
        return mpp, "tiff"
    power = positive_float(props.get("openslide.objective-power"))
    if power is not None:
        return 10.0 / power, "objective-power"
    sheet = positive_float(sheet_mpp)
    if sheet is not None:
        return sheet, "sheet"
    name = slide_name(osr) if hasattr(osr, "properties") else "slide"
    raise MppError(
        f"{name}: no microns per pixel: none of {', '.join(MPP_KEYS)} is set and the sample sheet "
        "has no mpp for it; add an `mpp` column (µm per level-0 pixel) to the sample sheet"
    )


def choose_level(level_downsamples: Sequence[float], slide_mpp: float, target_mpp: float,
                 tolerance: float, allow_upsample: bool = False) -> tuple[int, float]:
    """The coarsest level still at least as fine as ``target_mpp`` (within ``tolerance``).

    A level is adequate when its mpp ≤ target · (1 + tolerance): a 0.2527 µm/px scan serves 40x
    (0.25), a 0.5 µm/px scan does not. When no level is adequate, raise
    :class:`ResolutionUnavailable` unless ``allow_upsample`` (then level 0 is returned).
    """
    limit = target_mpp * (1.0 + tolerance)
    adequate = [i for i, ds in enumerate(level_downsamples) if slide_mpp * ds <= limit]
    if adequate:
        level = max(adequate, key=lambda i: level_downsamples[i])
        return level, float(level_downsamples[level])
    if allow_upsample:
        return 0, float(level_downsamples[0])
    raise ResolutionUnavailable(
        f"{10 / target_mpp:g}x ({target_mpp:g} µm/px) requested from a {10 / slide_mpp:.3g}x scan "
        f"({slide_mpp:.4g} µm/px); set allow_upsample: true to upsample"
    )


# openslide_read_region via openslide-python's ctypes binding; None where it is missing (then the
# public PIL API is used) or on big-endian machines (the byte order below assumes little-endian).
_READ_REGION = getattr(lowlevel, "_read_region", None) if sys.byteorder == "little" else None
_HANDLE_TYPE = getattr(lowlevel, "_OpenSlide", None)


def _fast_path(osr: openslide.AbstractSlide) -> bool:
    return _READ_REGION is not None and _HANDLE_TYPE is not None and isinstance(getattr(osr, "_osr", None), _HANDLE_TYPE)


def _read_bgra(osr: openslide.OpenSlide, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's premultiplied ARGB words straight into a numpy buffer: (h, w, 4) B, G, R, A bytes.

    Skips openslide-python's PIL round trip (un-premultiply, two full copies, a strided channel
    copy), measured here at about a third of the time of the read itself.
    """
    buf = np.empty((h, w, 4), np.uint8)
    if w and h:
        _READ_REGION(osr._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x0, y0, level, w, h)
    return buf


def _bgra_to_rgb(bgra: np.ndarray) -> np.ndarray:
    """Premultiplied BGRA → RGB on white: transparent (outside the slide) becomes white."""
    alpha = bgra[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    # premultiplied: over white is colour + (255 - alpha)
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB).astype(np.uint16) + (255 - alpha)[..., None]
    return np.minimum(rgb, 255).astype(np.uint8)


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Straight (not premultiplied) RGBA from openslide-python → RGB on white."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _openslide_rgb(osr: openslide.AbstractSlide, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    if _fast_path(osr):
        return _bgra_to_rgb(_read_bgra(osr, level, x0, y0, w, h))
    return _rgba_to_rgb(np.asarray(osr.read_region((x0, y0), level, (w, h))))


def read_window(osr: openslide.AbstractSlide, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Read ``w × h`` level px at ``level`` whose top-left is level-0 ``(x0, y0)`` as RGB uint8.

    JPEG-tiled TIFF levels are decoded directly where that gives OpenSlide's pixels (`tiles`);
    everything else, and every window the fast path declines, goes through OpenSlide. A decode
    failure raises :class:`SlideReadError` naming the slide, level and window; no filler is ever
    returned.
    """
    ds = float(osr.level_downsamples[level])  # after an error the handle answers nothing
    x0, y0, w, h, level = int(x0), int(y0), int(w), int(h), int(level)
    direct = tiles.reader_for(osr, getattr(osr, "_filename", None))
    rgb = None if direct is None else direct.read(level, x0, y0, w, h, partial(_openslide_rgb, osr))
    if rgb is not None:
        return rgb
    try:
        return _openslide_rgb(osr, level, x0, y0, w, h)
    except lowlevel.OpenSlideError as e:
        window = (x0, y0, int(round(w * ds)), int(round(h * ds)))
        raise SlideReadError(slide_name(osr), level, window, str(e)) from e


def read_at_mpp(osr, slide_mpp: float, out_mpp: float, tile: int = 512) -> np.ndarray:
    """The whole slide as RGB at exactly ``out_mpp`` µm/px (tissue segmentation, map backgrounds), read
    window by window from the coarsest level within `LEVEL_TOLERANCE` of fine enough."""
    level, ds = choose_level(osr.level_downsamples, slide_mpp, out_mpp, LEVEL_TOLERANCE, allow_upsample=True)
    lw, lh = osr.level_dimensions[level]
    w0, h0 = osr.dimensions
    out_w, out_h = max(1, round(w0 * slide_mpp / out_mpp)), max(1, round(h0 * slide_mpp / out_mpp))
    f = out_mpp / (slide_mpp * ds)  # level px per output px
    logger.info("slide image %dx%d at %.3g µm/px from level %d (downsample %.3g, %.3g level px/px)",
                out_w, out_h, out_mpp, level, ds, f)
    out = np.empty((out_h, out_w, 3), np.uint8)
    for oy in range(0, out_h, tile):
        for ox in range(0, out_w, tile):
            tw, th = min(tile, out_w - ox), min(tile, out_h - oy)
            lx0, ly0 = round(ox * f), round(oy * f)
            lx1, ly1 = max(lx0 + 1, min(lw, round((ox + tw) * f))), max(ly0 + 1, min(lh, round((oy + th) * f)))
            win = read_window(osr, level, round(lx0 * ds), round(ly0 * ds), lx1 - lx0, ly1 - ly0)
            interp = cv2.INTER_AREA if f >= 1 else cv2.INTER_LINEAR
            out[oy:oy + th, ox:ox + tw] = cv2.resize(win, (tw, th), interpolation=interp)
    return out
