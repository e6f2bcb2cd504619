"""Write pyramidal TIFF slides that OpenSlide really reads.

Two formats, both used by the demo cohort and the tests:

* ``write_aperio_svs`` — Aperio-SVS-like: tiled JPEG level pages with an ``Aperio Image Library``
  ImageDescription (``AppMag``, ``MPP``), a stripped thumbnail as the second page, then the
  smaller levels, then ``label`` and ``macro`` pages. OpenSlide reports vendor ``aperio``.
* ``write_generic_tiff`` — a generic tiled pyramidal TIFF, every level its own page (OpenSlide
  ignores SubIFDs), mpp stored as XResolution/YResolution in pixels per centimetre.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import tifffile

TILE = 256


def pyramid(rgb: np.ndarray, downsamples: Sequence[int]) -> list[np.ndarray]:
    """Area-downsampled copies of ``rgb`` (H × W × 3 uint8), one per integer downsample."""
    levels = []
    h, w = rgb.shape[:2]
    for ds in downsamples:
        if ds == 1:
            levels.append(rgb)
            continue
        size = (max(1, w // ds), max(1, h // ds))
        levels.append(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
    return levels


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


def write_aperio_svs(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float,
    app_mag: float,
    downsamples: Sequence[int] = (1, 4, 16),
    quality: int = 90,
    label: np.ndarray | None = None,
) -> Path:
    """Write ``rgb`` as an Aperio-like SVS at ``mpp`` µm/px scanned at ``app_mag``."""
    path = Path(path)
    levels = pyramid(rgb, downsamples)
    h, w = rgb.shape[:2]
    desc0 = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
        f"|AppMag = {app_mag:g}|MPP = {mpp:.4f}|ScanScope ID = E2EPATH|Filename = {path.stem}"
    )
    thumb = pyramid(rgb, [max(1, max(w, h) // 768)])[0]
    label = label if label is not None else np.full((200, 200, 3), 240, np.uint8)
    macro = pyramid(rgb, [max(1, max(w, h) // 600)])[0]
    tmp = _tmp(path)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        tif.write(levels[0], tile=(TILE, TILE), **jpeg, photometric="rgb",
                  description=desc0, metadata=None, subfiletype=0)
        tif.write(thumb, **jpeg, photometric="rgb", rowsperstrip=16,
                  description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> "
                              f"{thumb.shape[1]}x{thumb.shape[0]} - |AppMag = {app_mag:g}|MPP = {mpp:.4f}",
                  metadata=None, subfiletype=0)
        for ds, lev in zip(downsamples[1:], levels[1:]):
            tif.write(lev, tile=(TILE, TILE), **jpeg, photometric="rgb",
                      description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> "
                                  f"{lev.shape[1]}x{lev.shape[0]} - |AppMag = {app_mag:g}|MPP = {mpp * ds:.4f}",
                      metadata=None, subfiletype=0)
        tif.write(label, compression="lzw", photometric="rgb", rowsperstrip=label.shape[0],
                  description="Aperio Image Library v12.0.15\r\nlabel 200x200", metadata=None,
                  subfiletype=1)
        tif.write(macro, **jpeg, photometric="rgb", rowsperstrip=16,
                  description=f"Aperio Image Library v12.0.15\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
                  metadata=None, subfiletype=9)
    tmp.replace(path)
    return path


def write_generic_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 2, 4, 8),
    quality: int = 90,
) -> Path:
    """Write ``rgb`` as a generic tiled pyramidal TIFF; ``mpp=None`` leaves the resolution out."""
    path = Path(path)
    tmp = _tmp(path)
    with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for ds, lev in zip(downsamples, pyramid(rgb, downsamples)):
            kw = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * ds)
                kw = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(lev, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", metadata=None, subfiletype=0 if ds == 1 else 1, **kw)
    tmp.replace(path)
    return path
