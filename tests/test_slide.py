"""e2epath.slide on real slides written by e2epath.slidewriter and read back through OpenSlide."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from e2epath.slide import reader as sl
from e2epath.sources import slidewriter as sw
from helpers import corrupt_tile
from helpers import smooth_texture as texture


def rewrite_page0(path: Path, drop_mpp: bool, resolution_mpp: float | None = None) -> None:
    """Edit level 0's tags in place: remove ``|MPP = ...`` from the description, set a TIFF resolution."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        if drop_mpp:
            desc = page.tags["ImageDescription"].value
            page.tags["ImageDescription"].overwrite("|".join(p for p in desc.split("|") if not p.startswith("MPP")))
        if resolution_mpp is not None:
            px_per_cm = (round(1e4 / resolution_mpp * 1000), 1000)
            page.tags["XResolution"].overwrite(px_per_cm)
            page.tags["YResolution"].overwrite(px_per_cm)
            page.tags["ResolutionUnit"].overwrite(3)  # centimeter


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    img = texture(1999, 3001, seed=1)  # odd sizes on purpose
    out = {
        "aperio40": sw.write_aperio_svs(d / "aperio40.svs", img, mpp=0.2527, app_mag=40, downsamples=(1, 4, 16)),
        "generic20": sw.write_generic_tiff(d / "generic20.tif", img, mpp=0.5, downsamples=(1, 2, 4, 8)),
        "no_mpp": sw.write_generic_tiff(d / "no_mpp.tif", img[:512, :512], mpp=None, downsamples=(1, 2)),
    }
    small = img[:1024, :1536]
    out["tiff_only"] = sw.write_aperio_svs(d / "tiff_only.svs", small, mpp=0.2527, app_mag=40)
    rewrite_page0(out["tiff_only"], drop_mpp=True, resolution_mpp=0.26)
    out["power_only"] = sw.write_aperio_svs(d / "power_only.svs", small, mpp=0.5, app_mag=20)
    rewrite_page0(out["power_only"], drop_mpp=True)
    out["text"] = d / "text.svs"
    out["text"].write_text("this is not a slide\n")
    data = out["aperio40"].read_bytes()
    out["truncated"] = d / "truncated.svs"
    out["truncated"].write_bytes(data[: len(data) // 3])
    out["corrupt"] = d / "corrupt.svs"
    shutil.copy(out["aperio40"], out["corrupt"])
    corrupt_tile(out["corrupt"], col=5, row=3)
    out["_image"] = img  # type: ignore[assignment]
    return out


@pytest.mark.parametrize("name, sheet, mpp, source", [
    ("aperio40", None, 0.2527, "openslide"),
    # OpenSlide 4 itself turns a generic TIFF's resolution into openslide.mpp-x.
    ("generic20", None, 0.5, "openslide"),
    ("generic20", 0.9, 0.5, "openslide"),       # the slide's own value wins over the sheet
    ("tiff_only", None, 0.26, "tiff"),          # Aperio without MPP: OpenSlide ignores the TIFF resolution
    ("power_only", None, 0.5, "objective-power"),
    ("no_mpp", 0.33, 0.33, "sheet"),
])
def test_mpp_and_source(slides, name, sheet, mpp, source):
    osr = sl.open_slide(slides[name])
    got, got_source = sl.slide_mpp(osr, sheet)
    assert got == pytest.approx(mpp, rel=1e-3)
    assert got_source == source


def test_no_mpp_error_names_keys_and_remedy(slides):
    osr = sl.open_slide(slides["no_mpp"])
    with pytest.raises(sl.MppError) as err:
        sl.slide_mpp(osr, None)
    msg = str(err.value)
    for key in ("openslide.mpp-x", "tiff.XResolution", "openslide.objective-power", "`mpp` column", "no_mpp.tif"):
        assert key in msg


def test_mpp_from_properties_inch_and_placeholder_dpi():
    assert sl.slide_mpp({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}) == (pytest.approx(0.25), "tiff")
    # 72 dpi is a TIFF default, not a scan: fall through to the objective power
    props = {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch", "openslide.objective-power": "20"}
    assert sl.slide_mpp(props) == (pytest.approx(0.5), "objective-power")


@pytest.mark.parametrize("downsamples, slide_mpp, target, level", [
    ((1, 4, 16), 0.2527, 0.25, 0),    # 0.2527 µm/px is 40x
    ((1, 4, 16), 0.2527, 0.5, 0),     # level 1 (1.01) is too coarse for 20x
    ((1, 4, 16), 0.2527, 1.0, 1),     # 1.0108 is within 10 % of 1.0
    ((1, 4, 16), 0.2527, 2.0, 1),     # 5x: level 1, never level 0
    ((1, 2, 4, 8), 0.25, 2.0, 3),
    ((1, 2, 4, 8), 0.5, 2.0, 2),
    ((1, 2, 4, 8), 0.5, 0.5, 0),
    ((1, 4, 16.02), 0.25, 4.0, 2),    # non-integer downsample of a real pyramid
    ((1, 4, 16), 0.24, 0.25, 0),
    ((1, 4, 16), 0.28, 0.25, 0),      # 0.28 > 0.275: not 40x, but allow_upsample below
])
def test_choose_level_table(downsamples, slide_mpp, target, level):
    if slide_mpp > target * 1.1:
        with pytest.raises(sl.ResolutionUnavailable):
            sl.choose_level(downsamples, slide_mpp, target, 0.1)
        assert sl.choose_level(downsamples, slide_mpp, target, 0.1, allow_upsample=True) == (0, 1.0)
        return
    got_level, got_ds = sl.choose_level(downsamples, slide_mpp, target, 0.1)
    assert got_level == level
    assert got_ds == pytest.approx(downsamples[level])


def test_40x_from_20x_scan_is_unavailable():
    with pytest.raises(sl.ResolutionUnavailable) as err:
        sl.choose_level((1, 2, 4, 8), 0.5, 0.25, tolerance=0.1)
    msg = str(err.value)
    assert "40x" in msg and "20x" in msg and "allow_upsample: true" in msg


def test_read_window_is_rgb_and_matches_source(slides):
    osr = sl.open_slide(slides["aperio40"])
    img = slides["_image"]
    win = sl.read_window(osr, 0, 300, 200, 700, 500)
    assert win.dtype == np.uint8 and win.shape == (500, 700, 3)
    assert np.abs(win.astype(int) - img[200:700, 300:1000].astype(int)).mean() < 3
    # level 1 (downsample 4): level-0 origin, level-px size
    win1 = sl.read_window(osr, 1, 400, 800, 100, 50)
    ref = cv2.resize(img[800:1000, 400:800], (100, 50), interpolation=cv2.INTER_AREA)
    assert np.abs(win1.astype(int) - ref.astype(int)).mean() < 3


@pytest.mark.parametrize("level, x0, y0, w, h", [(0, 257, 3, 700, 333), (1, 1024, 512, 300, 200), (2, 16, 16, 170, 110)])
def test_read_window_equals_openslide_public_read(slides, level, x0, y0, w, h, monkeypatch):
    """The ctypes OpenSlide path equals openslide-python's public read (direct tiles: test_tiles.py)."""
    monkeypatch.setenv("E2EPATH_DIRECT_TILES", "0")
    osr = sl.open_slide(slides["aperio40"])
    ref = np.asarray(osr.read_region((x0, y0), level, (w, h)))
    assert (ref[..., 3] == 255).all()
    assert np.array_equal(sl.read_window(osr, level, x0, y0, w, h), ref[..., :3])


def test_transparent_pixels_composite_on_white_in_both_read_paths():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (40, 50)).astype(np.uint8)
    alpha[:5] = 0
    straight = np.dstack([rgb, alpha])                            # openslide-python's RGBA
    premult = (rgb.astype(np.float64) * alpha[..., None] / 255).round().astype(np.uint8)
    bgra = np.dstack([premult[..., ::-1], alpha])                 # OpenSlide's ARGB words, little-endian
    expect = rgb * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255)
    for got in (sl._rgba_to_rgb(straight), sl._bgra_to_rgb(bgra)):
        assert (got[:5] == 255).all()
        assert np.abs(got.astype(float) - expect).max() <= 1.01


def test_read_window_outside_slide_is_white(slides):
    osr = sl.open_slide(slides["aperio40"])
    win = sl.read_window(osr, 0, 3001 - 50, 0, 100, 10)
    assert (win[:, 50:] == 255).all()
    assert (win[:, :50] != 255).any()


@pytest.mark.parametrize("name, words", [
    ("text", ["text.svs", "not a slide format"]),
    ("truncated", ["truncated.svs"]),
])
def test_open_bad_files_names_the_file(slides, name, words):
    with pytest.raises(sl.SlideError) as err:
        osr = sl.open_slide(slides[name])
        sl.read_window(osr, osr.level_count - 1, 0, 0, *osr.level_dimensions[-1])
    for w in words:
        assert w in str(err.value)


def test_open_missing_file(tmp_path):
    with pytest.raises(sl.SlideError, match="missing.svs: slide file not found"):
        sl.open_slide(tmp_path / "missing.svs")


def test_corrupt_tile_raises_with_location_never_filler(slides):
    osr = sl.open_slide(slides["corrupt"])
    # rows 0-511 hold intact tiles only
    assert sl.read_window(osr, 0, 0, 0, 3001, 512).std() > 5
    with pytest.raises(sl.SlideReadError) as err:
        sl.read_window(osr, 0, 1024, 700, 512, 200)   # covers tile (col 5, row 3)
    e = err.value
    assert e.level == 0 and e.window == (1024, 700, 512, 200)
    assert "corrupt.svs" in str(e) and "x=1024 y=700 w=512 h=200" in str(e)
    assert "JPEG" in e.reason
    # the damaged file's other levels still decode (the pyramid was written from the intact image)
    assert sl.read_window(sl.open_slide(slides["corrupt"]), 1, 1024, 700, 128, 50).std() > 1
    assert os.path.getsize(slides["corrupt"]) == os.path.getsize(slides["aperio40"])
