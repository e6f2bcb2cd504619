"""QC → tissue → patching → LMDB on real slides (slidewriter + OpenSlide), through the step CLIs."""
from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from e2epath.preprocess import patching, qc, store, tissue
from e2epath.slide import reader as sl
from e2epath.sources import slidewriter as sw
from helpers import corrupt_tile

# Slide "tis20": Aperio 20x (0.5 µm/px), 6000 x 4000, pyramid 1/4/16.
TIS20_RECT = (1200, 800, 4800, 3200)         # x0, y0, x1, y1 (level-0 px)
TIS20_HOLE = ((2400, 2000), 200)              # centre, radius: a hole of 100 µm radius
TIS20_FRAGMENT = (5300, 300, 5600, 600)       # 150 x 150 µm: kept by "biopsy", dropped by "resection"
TIS20_PEN = ((5200, 3900), (5900, 1000))      # green pen stroke on glass
# Slide "tis40": generic TIFF 40x (0.25 µm/px), odd size 4001 x 2999, pyramid 1/2/4/8.
TIS40_DISC = ((1024, 1024), 1000)             # 250 µm radius, fills most of the first 5x patch


def he_like(h: int, w: int, tissue: np.ndarray, seed: int) -> np.ndarray:
    """Glass (near white, faint noise) and H&E-like tissue with structure at several scales."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 236, np.uint8) + rng.integers(0, 8, (h, w, 1), dtype=np.uint8)
    field = rng.integers(0, 255, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
    field = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) - 128
    pink = np.clip(np.array([205, 130, 180], np.float32) + 0.4 * field, 0, 255).astype(np.uint8)
    img[tissue > 0] = pink[tissue > 0]
    return img


def tis20_truth() -> tuple[np.ndarray, float]:
    m = np.zeros((4000, 6000), np.uint8)
    cv2.rectangle(m, TIS20_RECT[:2], (TIS20_RECT[2] - 1, TIS20_RECT[3] - 1), 1, -1)
    cv2.circle(m, *TIS20_HOLE, 0, -1)
    main_area = float(m.sum()) * 0.25  # µm²
    cv2.rectangle(m, TIS20_FRAGMENT[:2], (TIS20_FRAGMENT[2] - 1, TIS20_FRAGMENT[3] - 1), 1, -1)
    return m, main_area


def run_qc(out: Path, sid: str, path: Path, sheet_mpp: float | None = None) -> dict:
    args = ["--slide-id", sid, "--case-id", f"case-{sid}", "--path", str(path), "--out", str(out / f"slides/{sid}.json")]
    assert qc.cli(args + (["--sheet-mpp", str(sheet_mpp)] if sheet_mpp else [])) == 0
    return json.loads((out / f"slides/{sid}.json").read_text())


def run_tissue(out: Path, sid: str, preset: str = "resection", tag: str = "") -> dict:
    t = out / f"tissue{tag}"
    assert tissue.cli(["--qc", str(out / f"slides/{sid}.json"), "--mask-out", str(t / f"{sid}.png"),
                       "--geojson-out", str(t / f"{sid}.geojson"), "--thumb-out", str(t / "thumbs" / f"{sid}.png"),
                       "--preset", preset, "--seg-mpp", "8.0"]) == 0
    return json.loads((t / f"{sid}.geojson").read_text())


def patch_args(out: Path, sid: str, mag: int, *extra: str) -> list[str]:
    return ["--qc", str(out / f"slides/{sid}.json"), "--mask", str(out / f"tissue/{sid}.png"),
            "--geojson", str(out / f"tissue/{sid}.geojson"), "--magnification", str(mag), "--patch-size", "256",
            "--min-tissue", "0.5", "--mpp-tolerance", "0.1", "--jpeg-quality", "90", "--threads", "1",
            "--lmdb-out", str(out / f"lmdb/{mag}x/{sid}.lmdb"), "--row-out", str(out / f"patches/{mag}x/{sid}.json"),
            *extra]


def run_patch(out: Path, sid: str, mag: int, *extra: str) -> dict:
    assert patching.cli(patch_args(out, sid, mag, *extra)) == 0
    return json.loads((out / f"patches/{mag}x/{sid}.json").read_text())


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cohort")
    out = d / "results"
    truth20, _ = tis20_truth()
    img20 = he_like(4000, 6000, truth20, seed=2)
    cv2.line(img20, *TIS20_PEN, (30, 150, 50), 50)
    paths = {"tis20": sw.write_aperio_svs(d / "tis20.svs", img20, mpp=0.5, app_mag=20, downsamples=(1, 4, 16))}
    disc = np.zeros((2999, 4001), np.uint8)
    cv2.circle(disc, *TIS40_DISC, 1, -1)
    img40 = he_like(2999, 4001, disc, seed=3)
    paths["tis40"] = sw.write_generic_tiff(d / "tis40.tif", img40, mpp=0.25, downsamples=(1, 2, 4, 8))
    paths["blank"] = sw.write_generic_tiff(d / "blank.tif", he_like(1500, 2000, np.zeros((1500, 2000)), 4), mpp=0.5)
    paths["corrupt"] = d / "corrupt.svs"
    shutil.copy(paths["tis20"], paths["corrupt"])
    corrupt_tile(paths["corrupt"], col=12, row=10, seed=1)  # inside the tissue, level 0 only
    paths["missing"] = d / "missing.svs"
    paths["text"] = d / "text.svs"
    paths["text"].write_text("not a slide\n")
    paths["truncated"] = d / "truncated.svs"
    paths["truncated"].write_bytes(paths["tis40"].read_bytes()[:50_000])
    for sid, p in paths.items():
        run_qc(out, sid, p)
        run_tissue(out, sid)
    rows = {}
    for sid, mags in {"tis20": (40, 20, 10, 5), "tis40": (40, 20, 5), "blank": (20,), "corrupt": (20, 5),
                      "missing": (20,), "text": (20,), "truncated": (20,)}.items():
        for mag in mags:
            rows[sid, mag] = run_patch(out, sid, mag)
    return {"dir": d, "out": out, "paths": paths, "rows": rows, "img20": img20, "img40": img40}


def reader(cohort, sid: str, mag: int) -> store.LmdbReader:
    return store.LmdbReader(cohort["out"] / f"lmdb/{mag}x/{sid}.lmdb")


# ---------------------------------------------------------------- QC

def test_qc_record(cohort):
    rec = json.loads((cohort["out"] / "slides/tis40.json").read_text())
    assert tuple(rec) == qc.FIELDS
    assert rec["status"] == "ok" and rec["error"] is None
    assert (rec["width"], rec["height"], rec["level_count"]) == (4001, 2999, 4)
    assert rec["level_downsamples"] == pytest.approx([1, 2, 4, 8], rel=3e-3)
    assert rec["level_dimensions"][0] == [4001, 2999]
    assert rec["mpp"] == pytest.approx(0.25) and rec["mpp_source"] == "openslide"
    assert rec["vendor"] == "generic-tiff" and Path(rec["path"]).is_absolute()
    rec20 = json.loads((cohort["out"] / "slides/tis20.json").read_text())
    assert (rec20["vendor"], rec20["objective_power"], rec20["mpp"]) == ("aperio", 20.0, pytest.approx(0.5))


@pytest.mark.parametrize("sid, words", [("missing", ["missing.svs", "not found"]),
                                        ("text", ["text.svs", "Unsupported"]),
                                        ("truncated", ["truncated.svs"])])
def test_qc_bad_files_fail_with_openslide_text(cohort, sid, words):
    rec = json.loads((cohort["out"] / f"slides/{sid}.json").read_text())
    assert rec["status"] == "failed" and rec["mpp"] is None
    for w in words:
        assert w in rec["error"]


def test_qc_sheet_mpp_used_only_when_slide_has_none(cohort, tmp_path):
    p = sw.write_generic_tiff(tmp_path / "nompp.tif", cohort["img40"][:600, :800], mpp=None)
    assert run_qc(tmp_path, "nompp", p)["status"] == "failed"
    assert "`mpp` column" in run_qc(tmp_path, "nompp", p)["error"]
    rec = run_qc(tmp_path, "nompp", p, sheet_mpp=0.5)
    assert (rec["status"], rec["mpp"], rec["mpp_source"]) == ("ok", 0.5, "sheet")


def test_qc_table(cohort, tmp_path):
    jsons = sorted((cohort["out"] / "slides").glob("*.json"))
    assert qc.cli_table(["--out", str(tmp_path / "slides.tsv"), *map(str, jsons)]) == 0
    with open(tmp_path / "slides.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(jsons) and tuple(rows[0]) == qc.FIELDS
    by_id = {r["slide_id"]: r for r in rows}
    assert json.loads(by_id["tis40"]["level_downsamples"]) == pytest.approx([1, 2, 4, 8], rel=3e-3)
    assert by_id["text"]["status"] == "failed" and by_id["text"]["mpp"] == ""


# ---------------------------------------------------------------- tissue

def test_tissue_area_hole_pen_and_geojson(cohort):
    g = json.loads((cohort["out"] / "tissue/tis20.geojson").read_text())
    _, true_area = tis20_truth()
    props = g["properties"]
    assert props["status"] == "ok" and props["seg_mpp"] == 8.0
    assert props["mask_downsample"] == pytest.approx(16.0)
    assert props["tissue_area_um2"] == pytest.approx(true_area, rel=0.05)
    # one piece (fragment too small for "resection", pen excluded) with one hole as an interior ring
    assert g["type"] == "FeatureCollection" and len(g["features"]) == 1
    feat = g["features"][0]
    assert feat["properties"]["objectType"] == "annotation" and feat["geometry"]["type"] == "Polygon"
    rings = feat["geometry"]["coordinates"]
    assert len(rings) == 2 and all(r[0] == r[-1] for r in rings)
    outer, hole = np.array(rings[0]), np.array(rings[1])
    assert np.allclose([*outer.min(0), *outer.max(0)], TIS20_RECT, atol=2 * 16)   # level-0 px
    (cx, cy), rad = TIS20_HOLE
    assert np.allclose((hole.min(0) + hole.max(0)) / 2, (cx, cy), atol=16)
    assert np.ptp(hole[:, 0]) == pytest.approx(2 * rad, abs=3 * 16)
    mask = cv2.imread(str(cohort["out"] / "tissue/tis20.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (250, 375) and set(np.unique(mask)) == {0, 255}
    pen = np.zeros((4000, 6000), np.uint8)
    cv2.line(pen, *TIS20_PEN, 1, 50)
    pen_small = cv2.resize(pen, (375, 250), interpolation=cv2.INTER_AREA) > 0
    assert not mask[pen_small].any()
    thumb = cv2.imread(str(cohort["out"] / "tissue/thumbs/tis20.png"))
    assert thumb is not None and max(thumb.shape[:2]) == 1024


def test_black_ink_over_tissue_is_excluded_but_dark_nuclei_are_kept():
    """Black marker over tissue blends to a dark purple-grey (V 60-90, S < 110), not near-black;
    dense dark nuclei are as dark but saturated. Image at seg_mpp (8 µm/px): 1 px = 8 µm."""
    p = tissue.tissue_params("resection", seg_mpp=8.0)
    rgb = np.full((200, 300, 3), 242, np.uint8)                       # glass
    rgb[20:180, 20:280] = (234, 158, 196)                             # eosin-pink tissue
    rgb[40:100, 40:110] = (70, 40, 120)                               # dense dark nuclei, saturated
    band = np.zeros((200, 300), bool)
    band[120:150, 20:280] = True                                      # 240 µm wide ink band across
    ink = np.array((45, 45, 55), np.float32) / 255
    rgb[band] = (rgb[band] * (1 - 0.8 * (1 - ink))).round().astype(np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    assert hsv[135, 150, 2] > p.dark_value                            # the old near-black rule misses it
    mask = tissue.segment(rgb, p) > 0
    assert not mask[band].any()
    assert mask[50:90, 50:100].all()                                  # nuclei kept
    assert mask[30:35, 150:250].all() and mask[165:175, 150:250].all()  # tissue on both sides of the ink


def test_biopsy_preset_keeps_small_fragment(cohort):
    g = run_tissue(cohort["out"], "tis20", preset="biopsy", tag="_biopsy")
    _, main_area = tis20_truth()
    frag_area = (TIS20_FRAGMENT[2] - TIS20_FRAGMENT[0]) * (TIS20_FRAGMENT[3] - TIS20_FRAGMENT[1]) * 0.25
    assert len(g["features"]) == 2
    assert g["properties"]["tissue_area_um2"] == pytest.approx(main_area + frag_area, rel=0.05)


def test_tissue_failed_qc_gives_empty_outputs(cohort):
    for sid in ("missing", "text"):
        g = json.loads((cohort["out"] / f"tissue/{sid}.geojson").read_text())
        assert g["properties"]["status"] == "failed" and "QC failed" in g["properties"]["message"]
        assert g["features"] == []
        mask = cv2.imread(str(cohort["out"] / f"tissue/{sid}.png"), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and not mask.any()
        assert (cohort["out"] / f"tissue/thumbs/{sid}.png").stat().st_size > 0


def test_blank_slide_has_no_tissue(cohort):
    g = json.loads((cohort["out"] / "tissue/blank.geojson").read_text())
    assert g["properties"]["status"] == "no_tissue" and g["properties"]["tissue_area_um2"] == 0
    assert cohort["rows"]["blank", 20]["status"] == "no_tissue"
    assert len(reader(cohort, "blank", 20)) == 0


# ---------------------------------------------------------------- patching

@pytest.mark.parametrize("sid, mag, area_um2", [
    ("tis20", 20, tis20_truth()[1]),
    ("tis40", 40, np.pi * (TIS40_DISC[1] * 0.25) ** 2),
])
def test_patch_count_matches_tissue_area(cohort, sid, mag, area_um2):
    row = cohort["rows"][sid, mag]
    patch_area = (256 * 10 / mag) ** 2
    assert row["status"] == "ok"
    assert row["n_patches"] == pytest.approx(area_um2 / patch_area, rel=0.10)


@pytest.mark.parametrize("sid, mag, level, ds, scale", [
    ("tis20", 20, 0, 1, 1.0),
    ("tis20", 10, 0, 1, 2.0),
    ("tis20", 5, 1, 4, 1.0),       # never level 0 for 5x when level 1 serves
    ("tis40", 40, 0, 1, 1.0),
    ("tis40", 20, 1, 2, 1.0),
    ("tis40", 5, 3, 8, 1.0),
])
def test_read_level_recorded(cohort, sid, mag, level, ds, scale):
    r = reader(cohort, sid, mag)
    m = r.meta
    assert (m["read_level"], m["read_downsample"], m["scale"]) == (level, pytest.approx(ds, rel=3e-3), scale)
    assert m["mpp"] == 10 / mag and m["status"] == "ok" and m["format_version"] == 1
    assert cohort["rows"][sid, mag]["read_level"] == level
    assert len(r) == m["n_patches"] == cohort["rows"][sid, mag]["n_patches"] > 0
    assert r.coords.shape == (len(r), 2) and r.coords.dtype == np.int32
    assert (r.tissue >= 0.5).all() and len(r.tissue) == len(r)
    step = 256 * 10 / mag / m["slide_mpp"]   # grid step in level-0 px
    assert np.allclose(r.coords / step, np.round(r.coords / step), atol=0.02)


@pytest.mark.parametrize("sid, mag", [("tis20", 10), ("tis20", 5), ("tis40", 20), ("tis40", 40)])
def test_patches_match_direct_openslide_read(cohort, sid, mag):
    """Each patch = the level-0 region at the same place, INTER_AREA-resized (MAD < 3 grey levels)."""
    r = reader(cohort, sid, mag)
    osr = sl.open_slide(cohort["paths"][sid])
    side0 = round(256 * (10 / mag) / r.meta["slide_mpp"])
    rng = np.random.default_rng(0)
    for i in rng.choice(len(r), size=min(6, len(r)), replace=False):
        x, y = r.coords[i]
        ref = np.asarray(osr.read_region((int(x), int(y)), 0, (side0, side0)))[..., :3]
        ref = cv2.resize(ref, (256, 256), interpolation=cv2.INTER_AREA)
        got = r.get_rgb(int(i))
        assert got.shape == (256, 256, 3) and got.std() > 5
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3


def test_windows_cover_each_kept_patch_once():
    keep = np.random.default_rng(0).random((13, 29)) < 0.4
    seen = []
    for row, first, cols in patching.windows(keep, max_cols=8, max_gap=1):
        assert cols[0] == first and cols == sorted(cols) and cols[-1] // 8 == first // 8  # within a strip
        seen += [(row, c) for c in cols]
    assert sorted(seen) == sorted(zip(*np.nonzero(keep))) and len(seen) == len(set(seen))


def test_threads_give_the_same_store(cohort, tmp_path):
    args = patch_args(cohort["out"], "tis40", 40, "--threads", "3", "--window-px", "1000")
    args[args.index("--lmdb-out") + 1] = str(tmp_path / "t.lmdb")
    args[args.index("--row-out") + 1] = str(tmp_path / "t.json")
    assert patching.cli(args) == 0
    a, b = reader(cohort, "tis40", 40), store.LmdbReader(tmp_path / "t.lmdb")
    assert len(a) == len(b) > 0
    order_a = {tuple(xy): i for i, xy in enumerate(a.coords)}
    for j, xy in enumerate(b.coords):   # other window widths change the order, not the patches
        assert b.get_jpeg(j) == a.get_jpeg(order_a[tuple(xy)])


def _first_jpeg(rd: store.LmdbReader) -> bytes:
    return rd.get_jpeg(0)


def test_reader_pickles_and_reopens_after_fork(cohort):
    r = reader(cohort, "tis40", 40)
    first = r.get_jpeg(0)          # opened in the parent before forking
    clone = pickle.loads(pickle.dumps(r))
    assert clone.get_jpeg(0) == first and len(clone) == len(r)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_first_jpeg, [r]) == [first]
    with pytest.raises(IndexError):
        r.get_jpeg(len(r))


def test_40x_from_20x_scan_unavailable_unless_upsampling(cohort, tmp_path):
    row = cohort["rows"]["tis20", 40]
    assert row["status"] == "unavailable" and row["n_patches"] == 0
    assert "40x" in row["message"] and "20x" in row["message"] and "allow_upsample" in row["message"]
    r = reader(cohort, "tis20", 40)
    assert r.meta["status"] == "unavailable" and len(r) == 0
    assert sorted(r.keys()) == [b"__coords__", b"__meta__", b"__tissue__"]
    out = tmp_path / "up"
    args = patch_args(cohort["out"], "tis20", 40, "--allow-upsample")
    args[args.index("--lmdb-out") + 1] = str(out / "up.lmdb")
    args[args.index("--row-out") + 1] = str(out / "up.json")
    assert patching.cli(args) == 0
    up = store.LmdbReader(out / "up.lmdb")
    assert up.meta["status"] == "ok" and up.meta["scale"] == 0.5
    assert len(up) == pytest.approx(4 * cohort["rows"]["tis20", 20]["n_patches"], rel=0.1)


def test_corrupt_tile_fails_with_location_not_filler(cohort):
    row = cohort["rows"]["corrupt", 20]
    assert row["status"] == "failed" and row["n_patches"] == 0
    assert "corrupt.svs" in row["message"] and "level 0" in row["message"] and "x=" in row["message"]
    assert "JPEG" in row["message"]
    assert len(reader(cohort, "corrupt", 20)) == 0
    # the damaged tile is at level 0 only: 5x reads level 1 and is fine
    assert cohort["rows"]["corrupt", 5]["status"] == "ok"
    assert cohort["rows"]["corrupt", 5]["n_patches"] == cohort["rows"]["tis20", 5]["n_patches"]


@pytest.mark.parametrize("sid", ["missing", "text", "truncated"])
def test_bad_slides_give_failed_rows(cohort, sid):
    row = cohort["rows"][sid, 20]
    assert row["status"] == "failed" and "QC failed" in row["message"] and sid in row["message"]
    assert reader(cohort, sid, 20).meta["status"] == "failed"


def test_no_white_or_black_patches(cohort):
    for (sid, mag), row in cohort["rows"].items():
        if row["status"] != "ok":
            continue
        r = reader(cohort, sid, mag)
        for i in range(0, len(r), max(1, len(r) // 8)):
            rgb = r.get_rgb(i)
            assert 60 < rgb.mean() < 225, (sid, mag, i)


def test_killed_packing_leaves_no_store_and_the_rerun_removes_its_temporary(cohort, tmp_path, caplog):
    out = cohort["out"]
    args = patch_args(out, "tis20", 20)
    args[args.index("--lmdb-out") + 1] = str(tmp_path / "killed.lmdb")
    args[args.index("--row-out") + 1] = str(tmp_path / "killed.json")
    # A real CLI process that SIGKILLs itself midway through packing.
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:] = {sys.path!r}
        from e2epath.preprocess import store
        from e2epath.preprocess import patching
        add = store.LmdbWriter.add
        def dying_add(self, *a):
            add(self, *a)
            if len(self) == 100:
                os.kill(os.getpid(), signal.SIGKILL)
        store.LmdbWriter.add = dying_add
        print(os.getpid(), flush=True)
        patching.cli({args!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "killed.lmdb").exists() and not (tmp_path / "killed.json").exists()
    (stale,) = [p for p in tmp_path.iterdir()]
    assert stale.name == f".killed.lmdb.tmp-{proc_pid(proc)}" and stale.stat().st_size > 0
    with pytest.raises(FileNotFoundError):
        store.LmdbReader(tmp_path / "killed.lmdb")
    # an exception inside the writer removes its temporary file too
    with pytest.raises(RuntimeError), store.LmdbWriter(tmp_path / "raised.lmdb", 1 << 20) as w:
        w.add(b"x", (0, 0), 1.0)
        raise RuntimeError("boom")
    assert not any(p.name.startswith((".raised", "raised")) for p in tmp_path.iterdir())
    # the rerun completes and removes the killed job's temporary
    with caplog.at_level(logging.INFO, logger="e2epath.preprocess.store"):
        assert patching.cli(args) == 0
    assert len(store.LmdbReader(tmp_path / "killed.lmdb")) == cohort["rows"]["tis20", 20]["n_patches"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.json", "killed.lmdb"]
    assert f"removed {stale}" in caplog.text


def proc_pid(proc: subprocess.CompletedProcess) -> int:
    """The PID the killed child printed before packing (its temporary is named after it)."""
    return int(proc.stdout.decode().split()[0])


def test_manifest(cohort, tmp_path):
    jsons = sorted((cohort["out"] / "patches").glob("*x/*.json"))
    assert patching.cli_manifest(["--out", str(tmp_path / "manifest.tsv"), *map(str, jsons)]) == 0
    with open(tmp_path / "manifest.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert tuple(rows[0]) == patching.MANIFEST_FIELDS and len(rows) == len(cohort["rows"])
    got = {(r["slide_id"], int(r["magnification"])): r["status"] for r in rows}
    assert got == {k: v["status"] for k, v in cohort["rows"].items()}
