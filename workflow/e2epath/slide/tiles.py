"""Direct JPEG-tile reads for tiled TIFF slides (Aperio SVS, generic tiled TIFF).

Packing spends 80-90 % of its time inside OpenSlide's `read_region` (bench/preprocess.py);
decoding the same JPEG tiles with libjpeg-turbo (simplejpeg) is several times faster. A level is
read this way when:

- it is a tiled TIFF page of 8-bit, 3-sample, chunky JPEG tiles, as large as OpenSlide's level;
- a window starts at the level-0 pixel nearest a whole level pixel (where e2epath's patch grid,
  defined in level px, puts every window) and lies inside the level; elsewhere OpenSlide
  interpolates or pads, and is asked instead;
- tiles decoded both ways are the same image (this catches a colour space that libjpeg would
  guess differently from OpenSlide, e.g. RGB-photometric JPEG tiles).

A level whose downsample is a whole number gives exactly OpenSlide's pixels. A level whose
downsample is not (any level above 0 of an odd-sized scan: 40001 / 10000 = 4.0001) gives its
stored pixels, where OpenSlide maps the window to a fractional level position (level-0 x /
downsample) and resamples the tiles by that sub-pixel shift — at most half a level-0 pixel —
leaving faint seams at tile corners. The stored pixels are the patch grid's pixels; OpenSlide's
are within a mean grey level or two of them (tests/test_tiles.py).

Decoding is strict: a libjpeg warning ("Corrupt JPEG data", "Premature end of JPEG file") is an
error, and any failure hands the window back to OpenSlide, so OpenSlide's verdict — its error
naming the window, or its pixels — is what counts. Never a filler tile.
`E2EPATH_DIRECT_TILES=0` turns the fast path off.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import simplejpeg

logger = logging.getLogger(__name__)

Reference = Callable[[int, int, int, int, int], np.ndarray]  # OpenSlide's read: level, x0, y0, w, h

JPEG = 7  # TIFF Compression tag value of (new-style) JPEG
SOI = b"\xff\xd8"


def enabled() -> bool:
    return os.environ.get("E2EPATH_DIRECT_TILES", "1") != "0"


def decode_tile(data: bytes, tables: bytes | None) -> np.ndarray:
    """One TIFF JPEG tile → RGB uint8; shared JPEGTables are spliced in; warnings raise."""
    if not data.startswith(SOI):
        raise ValueError("tile is not a JPEG stream")
    if tables and len(tables) > 4:
        data = tables[:-2] + data[2:]  # tables: SOI … EOI; tile: SOI … EOI
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)


@dataclass
class JpegTileLevel:
    """The JPEG tiles of one pyramid level, read with `os.pread` (safe across threads)."""

    fd: int
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes | None
    tile_w: int
    tile_h: int
    width: int
    height: int

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    def tile(self, tx: int, ty: int) -> np.ndarray:
        i = ty * self.cols + tx
        n = int(self.counts[i])
        if n == 0:
            raise ValueError(f"tile ({tx}, {ty}) is empty")
        data = os.pread(self.fd, n, int(self.offsets[i]))
        if len(data) != n:
            raise ValueError(f"tile ({tx}, {ty}) is cut short by the end of the file")
        rgb = decode_tile(data, self.tables)
        if rgb.shape[0] < self.tile_h or rgb.shape[1] < self.tile_w:
            raise ValueError(f"tile ({tx}, {ty}) decodes to {rgb.shape[1]}x{rgb.shape[0]}, not the tile size")
        return rgb

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """Level px [lx, lx + w) × [ly, ly + h) as RGB; the window lies inside the level."""
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(ly // self.tile_h, (ly + h - 1) // self.tile_h + 1):
            for tx in range(lx // self.tile_w, (lx + w - 1) // self.tile_w + 1):
                t = self.tile(tx, ty)
                x0, y0 = tx * self.tile_w, ty * self.tile_h
                ax, ay = max(lx, x0), max(ly, y0)
                bx, by = min(lx + w, x0 + self.tile_w), min(ly + h, y0 + self.tile_h)
                out[ay - ly:by - ly, ax - lx:bx - lx] = t[ay - y0:by - y0, ax - x0:bx - x0]
        return out


class DirectTiles:
    """The levels of one slide that may be read directly (see the module docstring). A level is
    checked against OpenSlide the first time it is read, so reading one level never touches another."""

    def __init__(self, path: str | Path, level_dimensions, level_downsamples) -> None:
        import tifffile

        self.name = Path(path).name
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self.downsamples = [float(d) for d in level_downsamples]
        self.candidates: dict[int, JpegTileLevel] = {}
        self.levels: dict[int, JpegTileLevel | None] = {}  # checked: the reader, or None
        self.reasons: dict[int, str] = {}
        self.lock = threading.Lock()
        with tifffile.TiffFile(path) as tf:
            pages = [p for p in tf.pages if p.is_tiled]
            for level, dims in enumerate(level_dimensions):
                page = next((p for p in pages if (p.imagewidth, p.imagelength) == tuple(dims)), None)
                why = self._unusable(page)
                if why is None:
                    self.candidates[level] = JpegTileLevel(
                        self.fd, np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64),
                        page.jpegtables, page.tilewidth, page.tilelength, page.imagewidth, page.imagelength)
                else:
                    self.reasons[level] = why

    @staticmethod
    def _unusable(page) -> str | None:
        if page is None:
            return "no tiled TIFF page of the level's size"
        if page.compression != JPEG or page.samplesperpixel != 3 or page.bitspersample != 8 \
                or page.planarconfig != 1 or getattr(page, "imagedepth", 1) != 1:
            return f"tiles are not 8-bit RGB JPEG (compression {int(page.compression)})"
        return None

    def _compare(self, tiles: JpegTileLevel, level: int, tx: int, ty: int, reference: Reference) -> float:
        """Mean |difference| between tile (tx, ty) decoded here and read by OpenSlide."""
        lx, ly = tx * tiles.tile_w, ty * tiles.tile_h
        w, h = min(tiles.tile_w, tiles.width - lx), min(tiles.tile_h, tiles.height - ly)
        mine = tiles.read(lx, ly, w, h)
        ds = self.downsamples[level]
        theirs = reference(level, round(lx * ds), round(ly * ds), w, h)
        return float(np.abs(mine.astype(np.int16) - theirs.astype(np.int16)).mean())

    def _verify(self, tiles: JpegTileLevel, level: int, reference: Reference) -> str | None:
        """Decode test tiles both ways: the fast path must give OpenSlide's image. Tile (0, 0) sits
        at level-0 (0, 0) on every level, so OpenSlide reads it unresampled: equal, or the decoder
        differs. The middle tile has content; OpenSlide resamples it on a level whose downsample is
        not whole (by at most half a level-0 pixel), hence the looser bound there."""
        whole = abs(self.downsamples[level] - round(self.downsamples[level])) < 1e-9
        checks = [(tiles.cols // 2, (tiles.height // tiles.tile_h) // 2, 0.5 if whole else 4.0)]
        if not whole:
            checks.insert(0, (0, 0, 0.5))
        for tx, ty, bound in checks:
            try:
                diff = self._compare(tiles, level, tx, ty, reference)
            except Exception as err:  # noqa: BLE001 - a decoder failure, or OpenSlide's: OpenSlide reads it
                return f"test tile ({tx}, {ty}) cannot be compared: {err}"
            if diff >= bound:
                return f"decoded pixels of tile ({tx}, {ty}) differ from OpenSlide's (mean |diff| {diff:.1f})"
        return None

    def level(self, level: int, reference: Reference) -> JpegTileLevel | None:
        """The level's direct reader once it has passed its check; None: OpenSlide reads it."""
        if level in self.levels:
            return self.levels[level]
        with self.lock:
            if level not in self.levels:
                tiles = self.candidates.get(level)
                why = self.reasons.get(level) if tiles is None else self._verify(tiles, level, reference)
                self.levels[level] = tiles if why is None else None
                if why is not None:
                    self.reasons[level] = why
                how = "direct JPEG tile decoding (checked against OpenSlide)" if why is None else f"OpenSlide: {why}"
                logger.info("%s level %d: read with %s", self.name, level, how)
        return self.levels[level]

    def read(self, level: int, x0: int, y0: int, w: int, h: int, reference: Reference) -> np.ndarray | None:
        """RGB window at ``level`` from level-0 ``(x0, y0)``, or None where OpenSlide must answer.
        ``reference(level, x0, y0, w, h)`` is OpenSlide's read, for the level's first-use check."""
        if w <= 0 or h <= 0 or level not in self.candidates:
            return None
        ds = self.downsamples[level]
        tiles = self.candidates[level]
        lx, ly = round(x0 / ds), round(y0 / ds)
        off_grid = abs(x0 - lx * ds) > 0.5 + 1e-9 or abs(y0 - ly * ds) > 0.5 + 1e-9
        if off_grid or lx < 0 or ly < 0 or lx + w > tiles.width or ly + h > tiles.height:
            return None
        if self.level(level, reference) is None:
            return None
        try:
            return tiles.read(lx, ly, w, h)
        except Exception as err:  # noqa: BLE001 - whatever the decoder raises: OpenSlide decides
            logger.warning("%s level %d window x=%d y=%d w=%d h=%d: direct JPEG decoding failed (%s); "
                           "asking OpenSlide", self.name, level, x0, y0, w, h, err)
            return None


_READERS: "weakref.WeakKeyDictionary[object, DirectTiles | None]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_UNSET = object()


def reader_for(osr, path: str | Path | None) -> DirectTiles | None:
    """The slide's direct reader (built once per OpenSlide handle), or None where there is none.
    It holds no reference to ``osr``, so the handle is freed as usual and its entry with it."""
    if not enabled() or path is None:
        return None
    reader = _READERS.get(osr, _UNSET)
    if reader is not _UNSET:
        return reader
    with _LOCK:
        if osr not in _READERS:
            reader = None
            if osr.properties.get("openslide.vendor") in ("aperio", "generic-tiff"):
                try:
                    reader = DirectTiles(path, osr.level_dimensions, osr.level_downsamples)
                except Exception as err:  # noqa: BLE001 - any surprise in the file: OpenSlide reads it
                    logger.info("%s: direct JPEG tile reading off (%s)", path, err)
            _READERS[osr] = reader
        return _READERS[osr]
