"""Direct JPEG-tile reads (e2epath.tiles) give exactly OpenSlide's pixels, or step aside.

Real slides written by e2epath.slidewriter, read back through `slide.read_window` (which uses
the fast path where it may) and compared with OpenSlide's own `read_region`.
"""
from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import tifffile

from e2epath.slide import reader as sl
from e2epath.slide import tiles
from e2epath.sources import slidewriter as sw
from helpers import block_texture as texture
from helpers import corrupt_tile


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiles")
    img = texture(2048, 3072, 0)
    return {
        "aperio": sw.write_aperio_svs(d / "a.svs", img, mpp=0.25, app_mag=40, downsamples=(1, 4, 16)),
        "generic": sw.write_generic_tiff(d / "g.tif", img[:, :3000], mpp=0.5, downsamples=(1, 2, 4, 8)),
        "odd": sw.write_generic_tiff(d / "odd.tif", img[:2001, :2999], mpp=0.5, downsamples=(1, 2, 4, 8)),
        "odd_aperio": sw.write_aperio_svs(d / "odd.svs", img[:2001, :2999], mpp=0.25, app_mag=40, downsamples=(1, 4, 16)),
    }


def openslide_rgb(osr, level, x0, y0, w, h) -> np.ndarray:
    rgba = np.asarray(osr.read_region((x0, y0), level, (w, h)))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


@pytest.mark.parametrize("name, level, x0, y0, w, h", [
    ("aperio", 0, 0, 0, 1024, 256), ("aperio", 0, 300, 517, 700, 333), ("aperio", 1, 1024, 512, 300, 200),
    ("generic", 0, 13, 250, 2000, 300), ("generic", 1, 512, 256, 333, 111), ("generic", 3, 0, 0, 250, 250),
])
def test_direct_reads_equal_openslide_and_are_used(slides, name, level, x0, y0, w, h):
    osr = sl.open_slide(slides[name])
    got = sl.read_window(osr, level, x0, y0, w, h)
    reader = tiles.reader_for(osr, slides[name])
    assert reader is not None and reader.levels.get(level) is not None  # the fast path did this read
    assert np.array_equal(got, openslide_rgb(osr, level, x0, y0, w, h))


def stored_level(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The level's pixels as stored in the file, decoded by tifffile (imagecodecs), not OpenSlide."""
    with tifffile.TiffFile(path) as tf:
        return next(p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == size).asarray()


@pytest.mark.parametrize("name", ["odd", "odd_aperio"])
def test_levels_with_a_fractional_downsample_read_their_stored_pixels(slides, name):
    """Odd sizes: level 1's downsample is not whole (2999 / 1499). Windows on the level grid (the
    level-0 pixel nearest a whole level pixel, where patching puts them) give the stored pixels;
    OpenSlide resamples them by a sub-pixel shift and lands within a grey level or two."""
    osr = sl.open_slide(slides[name])
    ds = osr.level_downsamples[1]
    assert abs(ds - round(ds)) > 1e-4
    stored = stored_level(slides[name], osr.level_dimensions[1])
    for lx, ly, w, h in [(0, 0, 700, 300), (300, 117, 400, 250), (211, 77, 128, 64)]:
        x0, y0 = round(lx * ds), round(ly * ds)
        got = sl.read_window(osr, 1, x0, y0, w, h)
        assert np.array_equal(got, stored[ly:ly + h, lx:lx + w])
        theirs = sl._openslide_rgb(osr, 1, x0, y0, w, h)
        assert np.abs(got.astype(int) - theirs).mean() < 3
    reader = tiles.reader_for(osr, slides[name])
    assert reader.levels[1] is not None
    # one level-0 pixel further is not on the level grid: OpenSlide interpolates it
    x0 = round(211 * ds) + 1
    assert reader.read(1, x0, 0, 64, 64, lambda *a: sl._openslide_rgb(osr, *a)) is None
    assert np.array_equal(sl.read_window(osr, 1, x0, 0, 64, 64), sl._openslide_rgb(osr, 1, x0, 0, 64, 64))


def test_windows_off_the_pixel_grid_or_outside_go_to_openslide(slides):
    osr = sl.open_slide(slides["aperio"])
    reader, ref = tiles.reader_for(osr, slides["aperio"]), lambda *a: openslide_rgb(osr, *a)
    assert reader.read(1, 402, 800, 100, 50, ref) is None      # 402 / 4: not a whole level pixel
    assert reader.read(0, 3000, 0, 100, 10, ref) is None       # past the right edge: OpenSlide pads it white
    win = sl.read_window(osr, 0, 3000, 0, 100, 10)
    assert (win[:, 72:] == 255).all()
    assert np.array_equal(sl.read_window(osr, 1, 402, 800, 100, 50), openslide_rgb(osr, 1, 402, 800, 100, 50))


def test_a_level_that_decodes_differently_is_left_to_openslide(slides, monkeypatch):
    """The per-level check: a decoder that disagrees with OpenSlide (here: shifted colours) is not used."""
    real = tiles.decode_tile
    monkeypatch.setattr(tiles, "decode_tile", lambda data, tables: np.clip(real(data, tables).astype(int) + 9, 0, 255).astype(np.uint8))
    osr = sl.open_slide(slides["generic"])
    got = sl.read_window(osr, 0, 0, 0, 512, 512)
    reader = tiles.reader_for(osr, slides["generic"])
    assert reader.levels[0] is None and "differ from OpenSlide" in reader.reasons[0]
    assert np.array_equal(got, openslide_rgb(osr, 0, 0, 0, 512, 512))


def test_corrupt_tile_is_an_error_with_the_window_never_filler(slides, tmp_path):
    path = tmp_path / "corrupt.svs"
    shutil.copy(slides["aperio"], path)
    offset, count = corrupt_tile(path, col=1, row=2)              # tile (col 1, row 2) of level 0
    osr = sl.open_slide(path)
    with tifffile.TiffFile(path) as tif:                          # strict decoding refuses the tile
        page = tif.pages[0]
        data = open(path, "rb").read()[offset:offset + count]
        with pytest.raises(ValueError):
            tiles.decode_tile(data, page.jpegtables)
    assert sl.read_window(osr, 0, 0, 0, 1024, 256).std() > 5      # rows of intact tiles: direct, fine
    with pytest.raises(sl.SlideReadError) as err:
        sl.read_window(osr, 0, 200, 600, 300, 100)                # covers tile (1, 2)
    assert "x=200 y=600 w=300 h=100" in str(err.value) and "JPEG" in err.value.reason


def test_a_read_slide_is_freed_with_its_reader(slides):
    """The reader cache must not keep OpenSlide handles (and file descriptors) alive."""
    osr = sl.open_slide(slides["aperio"])
    sl.read_window(osr, 0, 0, 0, 256, 256)
    handle, reader = weakref.ref(osr), weakref.ref(tiles.reader_for(osr, slides["aperio"]))
    del osr
    gc.collect()
    assert handle() is None and reader() is None


def test_switch_off_reads_through_openslide(slides, monkeypatch):
    monkeypatch.setenv("E2EPATH_DIRECT_TILES", "0")
    osr = sl.open_slide(slides["aperio"])
    assert tiles.reader_for(osr, slides["aperio"]) is None
    assert np.array_equal(sl.read_window(osr, 0, 5, 7, 300, 200), openslide_rgb(osr, 0, 5, 7, 300, 200))


def split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """A full JPEG → (JPEGTables: SOI + DQT/DHT + EOI, abbreviated stream without them), as in Aperio files."""
    tables, rest, i = [b"\xff\xd8"], [b"\xff\xd8"], 2
    while jpeg[i:i + 2] != b"\xff\xda":                       # segments up to start-of-scan
        n = int.from_bytes(jpeg[i + 2:i + 4], "big")
        (tables if jpeg[i + 1] in (0xDB, 0xC4) else rest).append(jpeg[i:i + 2 + n])
        i += 2 + n
    return b"".join(tables) + b"\xff\xd9", b"".join(rest) + jpeg[i:]


def test_shared_jpeg_tables_are_spliced_in():
    rgb = texture(256, 256, 3)
    full = tiles.simplejpeg.encode_jpeg(rgb, quality=90, colorspace="RGB")
    tables, abbreviated = split_tables(full)
    assert len(abbreviated) < len(full) and b"\xff\xdb" not in abbreviated[:200]
    assert np.array_equal(tiles.decode_tile(abbreviated, tables), tiles.simplejpeg.decode_jpeg(full))
    with pytest.raises(ValueError):
        tiles.decode_tile(abbreviated, None)                     # no tables: refused, not guessed
    with pytest.raises(ValueError, match="not a JPEG"):
        tiles.decode_tile(abbreviated[2:], tables)
