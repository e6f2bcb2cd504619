"""Slide-level attention maps (`python -m e2epath slide_maps`, e2epath.figures.maps) from real
parts: pyramidal TIFF slides read through OpenSlide, QC, tissue contours and LMDB patch stores
made by the preprocessing steps, and attention files in the training runs' format."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from e2epath.core.layout import MAPS_INDEX, PREDICT_FILES
from e2epath.figures import maps
from e2epath.preprocess import qc as qc_step
from e2epath.preprocess import tissue
from e2epath.preprocess.patching import PatchParams, patch_to_files
from e2epath.preprocess.store import LmdbReader, LmdbWriter, close_all
from e2epath.sources.slidewriter import write_generic_tiff
from helpers import smooth_texture

MPP = 0.5  # slide µm/px (20x)
MAG = 10  # patches at 10x: 64 px patches are 128 level-0 px
SIZES = {"SA": (1536, 1024), "SB": (1280, 1024)}  # level-0 (w, h)


def _slide_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """Glass with an elliptic piece of tissue of random texture (each patch looks different)."""
    rgb = np.full((h, w, 3), 238, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w * 2 // 5, h * 2 // 5), 0, 0, 360, 1, -1)
    tex = smooth_texture(h, w, seed)
    rgb[mask > 0] = tex[mask > 0]
    return rgb


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Two slides through QC, tissue segmentation and patching, as the workflow lays them out:
    QC table, contours/{slide}.geojson, lmdb/{mag}x/{slide}.lmdb."""
    d = tmp_path_factory.mktemp("maps")
    records = []
    for i, (slide, (w, h)) in enumerate(SIZES.items()):
        (d / "slides").mkdir(exist_ok=True)
        path = write_generic_tiff(d / "slides" / f"{slide}.tif", _slide_rgb(w, h, i), mpp=MPP, downsamples=(1, 4))
        rec = qc_step.slide_qc(slide, f"case-{slide}", path)
        assert rec["status"] == "ok", rec
        records.append(rec)
        t = tissue.run(rec, tissue.tissue_params("biopsy", 8.0), d / "masks" / f"{slide}.png",
                       d / "contours" / f"{slide}.geojson", d / "thumbs" / f"{slide}.png", "biopsy")
        assert t.get("status", "ok") == "ok", t
        params = PatchParams(MAG, 64, 0.5, 0.1, False, 90, 1)
        row = patch_to_files(rec, d / "masks" / f"{slide}.png", d / "contours" / f"{slide}.geojson", params,
                             d / "lmdb" / f"{MAG}x" / f"{slide}.lmdb", d / "rows" / f"{slide}.json")
        assert row["status"] == "ok" and row["n_patches"] >= 12, row
    table = d / "slides.tsv"
    pd.DataFrame(records, columns=list(qc_step.FIELDS)).to_csv(table, sep="\t", index=False)
    stores = {s: LmdbReader(d / "lmdb" / f"{MAG}x" / f"{s}.lmdb") for s in SIZES}
    return {"dir": d, "table": table, "records": {r["slide_id"]: r for r in records},
            "coords": {s: r.coords.astype(np.int64) for s, r in stores.items()},
            "patch_l0": {s: maps.patch_side_l0(r.meta) for s, r in stores.items()}}


def _attention(rng: np.random.Generator, n: int, heads: int = 2) -> np.ndarray:
    logits = rng.normal(0, 1.0, (heads, n))
    return (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)


def _write_npz(path: Path, slides: dict[str, tuple[np.ndarray, np.ndarray]], mag: int = MAG) -> Path:
    """An attention.npz as train/job.py writes it: {slide}: [heads, N], {slide}__coords: [N, 2]."""
    arrays = {"__magnification__": np.array(mag)}
    for slide, (att, coords) in slides.items():
        arrays[slide] = att.astype(np.float32)
        arrays[f"{slide}__coords"] = coords.astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _argv(cohort: dict, attention: list[Path], out: Path, *extra: str, table: Path | None = None,
          lmdb: Path | None = None) -> list[str]:
    d = cohort["dir"]
    return ["--attention", *map(str, attention), "--slides", str(table or cohort["table"]), "--rows",
            "--contours-dir", str(d / "contours"), "--lmdb-dir", str(lmdb or d / "lmdb"), "--out-dir", str(out),
            "--map-mpp", "8", "--top-k", "3", *extra]


def _index(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / MAPS_INDEX, sep="\t", dtype={"slide_id": str}, keep_default_na=False).set_index(
        "slide_id")


def _geojson(out: Path, slide: str) -> dict:
    return json.loads((out / PREDICT_FILES["geojson"].format(slide=slide)).read_text())


def _measurements(geo: dict) -> pd.DataFrame:
    return pd.DataFrame([f["properties"]["measurements"] for f in geo["features"]])


def _montage_cells(out: Path, slide: str, n: int, cell: int = 128) -> list[np.ndarray]:
    img = cv2.cvtColor(cv2.imread(str(out / PREDICT_FILES["montage"].format(slide=slide))), cv2.COLOR_BGR2RGB)
    cols = img.shape[1] // cell
    return [img[(i // cols) * (cell + 16):(i // cols) * (cell + 16) + cell, (i % cols) * cell:(i % cols + 1) * cell]
            for i in range(n)]


def _cell_of(rgb: np.ndarray, cell: int = 128) -> np.ndarray:
    return cv2.resize(rgb, (cell, cell), interpolation=cv2.INTER_AREA)


def test_maps_of_two_slides_one_stored_in_another_order(cohort, tmp_path):
    """SA's attention is in its store's order; SB's in reverse order, so the montage must find its
    patches by coordinates. Every file is checked against the attention that was written."""
    rng = np.random.default_rng(0)
    att = {s: _attention(rng, len(cohort["coords"][s])) for s in SIZES}
    reverse = cohort["coords"]["SB"][::-1].copy()
    npz = _write_npz(tmp_path / "run/attention.npz",
                     {"SA": (att["SA"], cohort["coords"]["SA"]), "SB": (att["SB"], reverse)})
    out = tmp_path / "maps"
    assert maps.cli(_argv(cohort, [npz], out)) == 0
    index = _index(out)
    assert sorted(index.index) == ["SA", "SB"] and (index["status"] == "ok").all(), index
    for slide, coords in (("SA", cohort["coords"]["SA"]), ("SB", reverse)):
        row = index.loc[slide]
        assert row["n_patches"] == len(coords)
        for key in maps.MAP_FILES:
            assert row[key] == PREDICT_FILES[key].format(slide=slide)
            assert (out / row[key]).stat().st_size > 0
        # the map: the slide at 8 µm/px
        w, h = SIZES[slide]
        png = cv2.cvtColor(cv2.imread(str(out / row["map"])), cv2.COLOR_BGR2RGB).astype(int)
        assert png.shape[:2] == (round(h * MPP / 8), round(w * MPP / 8))
        mean = att[slide].mean(0)  # jet: the most attended patch dark red, the least dark blue
        for i, redder in ((int(np.argmax(mean)), True), (int(np.argmin(mean)), False)):
            x, y = ((coords[i] + 128 // 2) * MPP / 8).astype(int)  # the patch's centre in map px
            r, _, b = np.median(png[y - 2:y + 2, x - 2:x + 2].reshape(-1, 3), axis=0)
            assert (r - b > 20) if redder else (b - r > 20), (slide, i, r, b)
        # the GeoJSON: one detection per patch, in the attention's order, inside the slide
        geo = _geojson(out, slide)
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
        assert geo["properties"]["slide_id"] == slide and geo["properties"]["magnification"] == MAG
        side = cohort["patch_l0"][slide]
        assert side == 128.0
        for f, (x, y) in zip(geo["features"], coords):
            assert f["type"] == "Feature" and f["properties"]["objectType"] == "detection"
            assert f["geometry"]["type"] == "Polygon"
            ring = np.asarray(f["geometry"]["coordinates"][0])
            assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
            assert ring.min(0).tolist() == [x, y] and ring.max(0).tolist() == [x + side, y + side]
            assert (ring >= 0).all() and (ring[:, 0] <= w).all() and (ring[:, 1] <= h).all()
        meas = _measurements(geo)
        assert list(meas.columns) == ["attention head 1", "attention head 2", "attention mean"]
        np.testing.assert_allclose(meas["attention head 1"], att[slide][0], rtol=1e-6)
        np.testing.assert_allclose(meas["attention head 2"], att[slide][1], rtol=1e-6)
        np.testing.assert_allclose(meas["attention mean"], att[slide].astype(np.float64).mean(0), rtol=1e-6)
    # the montage of SB shows the patch at the most attended coords, read from the store by coords
    store = LmdbReader(cohort["dir"] / f"lmdb/{MAG}x/SB.lmdb")
    stored = {tuple(c): i for i, c in enumerate(store.coords.tolist())}
    top = int(np.argmax(att["SB"].mean(0)))
    want = _cell_of(store.get_rgb(stored[tuple(reverse[top])]))
    wrong = _cell_of(store.get_rgb(top))  # what the attention's index would pick
    got = _montage_cells(out, "SB", 1)[0].astype(float)
    err, err_wrong = np.abs(got - want).mean(), np.abs(got - wrong).mean()
    assert err < 3 and err_wrong > 3 * err, (err, err_wrong)
    close_all()


def test_a_slide_in_several_attention_files_gets_their_mean(cohort, tmp_path, caplog):
    """The fold models of a method predicting one cohort: one measurement per model and head, the
    map from the mean over models of the mean over heads. Files whose coords disagree fail the slide,
    naming both files; the other slide is still drawn."""
    rng = np.random.default_rng(1)
    a, b = cohort["coords"]["SA"], cohort["coords"]["SB"]
    att1 = {"SA": _attention(rng, len(a), 2), "SB": _attention(rng, len(b), 1)}
    att2 = {"SA": _attention(rng, len(a), 2), "SB": _attention(rng, len(b), 1)}
    shifted = b + np.array([16, 0])
    f1 = _write_npz(tmp_path / "fold0.attention.npz", {"SA": (att1["SA"], a), "SB": (att1["SB"], b)})
    f2 = _write_npz(tmp_path / "fold1.attention.npz", {"SA": (att2["SA"], a), "SB": (att2["SB"], shifted)})
    out = tmp_path / "maps"
    with caplog.at_level(logging.INFO):
        assert maps.cli(_argv(cohort, [f1, f2], out)) == 0
    index = _index(out)
    assert index.loc["SA", "status"] == "ok"
    meas = _measurements(_geojson(out, "SA"))
    assert list(meas.columns) == ["attention model 1 head 1", "attention model 1 head 2",
                                  "attention model 2 head 1", "attention model 2 head 2", "attention mean"]
    hand = (att1["SA"].astype(np.float64).mean(0) + att2["SA"].astype(np.float64).mean(0)) / 2
    np.testing.assert_allclose(meas["attention mean"], hand, rtol=1e-6)
    np.testing.assert_allclose(meas["attention model 2 head 1"], att2["SA"][0], rtol=1e-6)
    assert not np.allclose(meas["attention mean"], att1["SA"].mean(0), rtol=1e-3)  # not one file's alone
    assert index.loc["SB", "status"] == "failed"
    assert str(f1) in index.loc["SB", "message"] and str(f2) in index.loc["SB", "message"]
    assert index.loc["SB", "map"] == "" and not list(out.glob("SB.*"))
    assert "1 written, 1 failed" in caplog.text  # the run's log line


def test_bad_slides_fail_alone(cohort, tmp_path):
    """A missing store, a slide that failed QC, an unreadable slide file and a damaged store each
    give a failed row with the reason (and no files); the good slide is drawn and the step succeeds."""
    d = cohort["dir"]
    rng = np.random.default_rng(2)
    a, b = cohort["coords"]["SA"], cohort["coords"]["SB"]
    lmdb = tmp_path / "lmdb"  # SA's and a copy of SA's store for SD; none for SB
    (lmdb / f"{MAG}x").mkdir(parents=True)
    for name in ("SA", "SC", "SD"):
        shutil.copy(d / f"lmdb/{MAG}x/SA.lmdb", lmdb / f"{MAG}x/{name}.lmdb")
    with LmdbWriter(lmdb / f"{MAG}x/SE.lmdb", 1 << 22) as writer:  # a damaged store: patches no JPEGs
        for xy in a:
            writer.add(b"not a jpeg", xy, 1.0)
        writer.close(LmdbReader(d / f"lmdb/{MAG}x/SA.lmdb").meta)
    text = tmp_path / "SD.tif"
    text.write_text("not a slide\n")
    records = pd.read_csv(cohort["table"], sep="\t", dtype={"slide_id": str})
    extra = pd.DataFrame([{**cohort["records"]["SA"], "slide_id": "SC", "status": "failed",
                           "error": "OpenSlide could not read tile 3"},
                          {**cohort["records"]["SA"], "slide_id": "SD", "path": str(text)},
                          {**cohort["records"]["SA"], "slide_id": "SE"}])
    table = tmp_path / "slides.tsv"
    pd.concat([records, extra[records.columns]]).to_csv(table, sep="\t", index=False)
    npz = _write_npz(tmp_path / "attention.npz", {"SA": (_attention(rng, len(a)), a), "SB": (_attention(rng, len(b)), b),
                                                 "SC": (_attention(rng, len(a)), a), "SD": (_attention(rng, len(a)), a),
                                                 "SE": (_attention(rng, len(a)), a)})
    out = tmp_path / "maps"
    assert maps.cli(_argv(cohort, [npz], out, table=table, lmdb=lmdb)) == 0
    index = _index(out)
    assert index["status"].to_dict() == {"SA": "ok", "SB": "failed", "SC": "failed", "SD": "failed", "SE": "failed"}
    assert "SB.lmdb not found" in index.loc["SB", "message"]
    assert "slide QC failed: OpenSlide could not read tile 3" in index.loc["SC", "message"]
    assert index.loc["SD", "message"]  # OpenSlide's reason
    assert "not a decodable JPEG" in index.loc["SE", "message"]  # after its map was drawn: that goes too
    assert index.loc["SB", "n_patches"] == len(b)
    for slide in ("SB", "SC", "SD", "SE"):
        assert not list(out.glob(f"{slide}.*"))
    for key in maps.MAP_FILES:
        assert (out / index.loc["SA", key]).is_file()
    close_all()


def test_the_folder_is_replaced_whole_and_a_fine_map_is_refused(cohort, tmp_path, capsys):
    a = cohort["coords"]["SA"]
    npz = _write_npz(tmp_path / "attention.npz", {"SA": (_attention(np.random.default_rng(3), len(a)), a)})
    out = tmp_path / "maps"
    out.mkdir()
    (out / "stale.png").write_bytes(b"left by an earlier run")
    with pytest.raises(SystemExit) as refused:
        maps.cli(_argv(cohort, [npz], out, "--map-mpp", "1"))
    assert refused.value.code == 2 and "--map-mpp 1" in capsys.readouterr().err
    assert (out / "stale.png").is_file()  # nothing touched
    assert maps.cli(_argv(cohort, [npz], out, "--top-k", "50")) == 0  # more than the patches: all, once
    assert sorted(p.name for p in out.iterdir()) == sorted([MAPS_INDEX, *(PREDICT_FILES[k].format(slide="SA")
                                                                          for k in maps.MAP_FILES)])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    montage = cv2.imread(str(out / PREDICT_FILES["montage"].format(slide="SA")))
    assert montage.shape[:2] == (128 + 16, len(a) * 128)  # every patch shown, once: one row
    assert all(c.mean() < 250 for c in _montage_cells(out, "SA", len(a)))  # no blank cell
    close_all()


def test_a_missing_attention_file_stops_the_step_before_writing(cohort, tmp_path, caplog):
    out = tmp_path / "maps"
    with caplog.at_level(logging.ERROR):
        assert maps.cli(_argv(cohort, [tmp_path / "nope.npz"], out)) == 2
    assert "nope.npz" in caplog.text and not out.exists()
