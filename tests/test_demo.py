"""The demo cohort: real slide files through OpenSlide, a sheet that matches plan(), sane labels,
and a positive signal that is present, distinct and small."""
from __future__ import annotations

import math

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from e2epath.core.vocabulary import ID_RE
from e2epath.sources import demo, sheets

N, SCALE = 6, 0.25  # small slides: 6 slides cover every format; 40x ones are 2000 × 1500 px


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "cohort"
    demo.write(out, n_slides=N, seed=3, scale=SCALE)
    return out


def _read_all(path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def test_plan_is_the_written_sheet(cohort):
    sheet = pd.read_csv(cohort / "slides.tsv", sep="\t")
    pd.testing.assert_frame_equal(sheet, demo.plan(N, seed=3))
    assert list(sheet.columns) == ["slide_id", "path", "case_id", "mpp"]
    assert all((cohort / p).is_file() for p in sheet.path)
    assert not set(sheet.case_id) & set(sheet.slide_id)


def test_cases_and_classes_of_default_cohort():
    specs = demo.design(24, seed=0)
    sheet = demo.plan(24, seed=0)
    labels = demo.subtype_labels(specs)
    per_case = sheet.groupby("case_id").size()
    assert 15 <= len(per_case) <= 20 and per_case.max() <= 3 and (per_case > 1).any()
    counts = labels.label.value_counts()
    assert set(counts.index) == set(demo.CLASSES) and abs(counts.iloc[0] - counts.iloc[1]) <= 1
    # a case is positive exactly when one of its slides is
    truth = {c: any(s.positive for s in specs if s.case_id == c) for c in labels.case_id}
    assert all((lab == "positive") == truth[c] for c, lab in labels.itertuples(index=False))
    # exactly one slide's mpp comes from the sheet; formats: both kinds, generic at 20x and 40x
    assert sheet.mpp.notna().sum() == 1
    kinds = {(s.kind, s.mpp) for s in specs}
    assert kinds == {("svs", 0.25), ("tiff", 0.5), ("tiff", 0.25)}
    assert 4 <= sum(s.pen is not None for s in specs) <= 12


def test_survival_follows_the_signal():
    specs = demo.design(24, seed=0)
    surv = demo.survival_labels(specs, seed=0).merge(demo.subtype_labels(specs), on="case_id")
    assert surv.time.median() > 0
    by_class = surv.groupby("label").time.mean()
    assert by_class["positive"] < by_class["negative"]


def test_label_tables(cohort):
    cases = set(pd.read_csv(cohort / "slides.tsv", sep="\t").case_id)
    sub = pd.read_csv(cohort / "labels" / "subtype.csv")
    surv = pd.read_csv(cohort / "labels" / "survival.csv")
    for table in (sub, surv):
        assert set(table.case_id) == cases and table.case_id.is_unique
        assert not table.isna().any().any()
    assert set(sub.label) <= set(demo.CLASSES)
    assert set(surv.event) <= {0, 1} and (surv.time > 0).all()


def test_openslide_reads_every_slide(cohort):
    sheet = pd.read_csv(cohort / "slides.tsv", sep="\t")
    specs = {s.slide_id: s for s in demo.design(N, seed=3)}
    for row in sheet.itertuples():
        spec = specs[row.slide_id]
        with openslide.OpenSlide(str(cohort / row.path)) as s:
            props = s.properties
            assert s.dimensions == spec.size(SCALE), row.slide_id
            assert np.allclose(s.level_downsamples, spec.downsamples, rtol=0.02), row.slide_id
            if spec.kind == "svs":
                assert props["openslide.vendor"] == "aperio"
                assert float(props["openslide.objective-power"]) == 40
                assert float(props["openslide.mpp-x"]) == pytest.approx(0.25)
                assert {"thumbnail", "label", "macro"} <= set(s.associated_images)
            else:
                assert props["openslide.vendor"] == "generic-tiff"
                if math.isnan(row.mpp):  # OpenSlide 4 turns TIFF resolution into openslide.mpp-x
                    assert float(props["openslide.mpp-x"]) == pytest.approx(spec.mpp)
                else:  # nothing in the file says the mpp: only the sheet does
                    assert "openslide.mpp-x" not in props and "openslide.objective-power" not in props
                    assert row.mpp == spec.mpp
            # readable up to the last pixel (odd sizes too): opaque, not OpenSlide's empty fill
            w, h = s.dimensions
            corner = np.asarray(s.read_region((w - 4, h - 4), 0, (4, 4)))
            assert (corner[..., 3] == 255).all(), row.slide_id
    assert any(demo.design(N, seed=3)[i].odd_size for i in range(N))


def test_same_seed_same_cohort(cohort, tmp_path):
    again = tmp_path / "again"
    demo.write(again, n_slides=N, seed=3, scale=SCALE)
    for name in ("slides.tsv", "labels/subtype.csv", "labels/survival.csv"):
        assert (again / name).read_bytes() == (cohort / name).read_bytes(), name
    for path in pd.read_csv(cohort / "slides.tsv", sep="\t").path[:3]:
        assert np.array_equal(_read_all(again / path), _read_all(cohort / path)), path


def test_other_seed_other_pixels():
    spec = demo.design(N, seed=3)[0]
    a = demo.render_slide(spec, seed=3, scale=SCALE).rgb
    b = demo.render_slide(spec, seed=4, scale=SCALE).rgb
    assert a.shape == b.shape and not np.array_equal(a, b)


def _check_signal(folder, specs: list, seed: int) -> None:
    """Positive slides carry a small signal, darker and bluer than the other tissue (read back
    through OpenSlide); negative slides none."""
    assert any(s.positive for s in specs) and not all(s.positive for s in specs)
    for spec in specs:
        slide = demo.render_slide(spec, seed=seed, scale=SCALE)
        fraction = slide.signal.sum() / slide.tissue.sum()
        assert not (slide.signal & ~slide.tissue).any()
        if not spec.positive:
            assert fraction == 0, spec.slide_id
            continue
        assert 0 < fraction <= 0.10, (spec.slide_id, fraction)
        rgb = _read_all(folder / spec.path).astype(float)
        size = rgb.shape[1::-1]
        signal = cv2.resize(slide.signal.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        other = cv2.resize((slide.tissue & ~slide.signal).astype(np.uint8), size,
                           interpolation=cv2.INTER_NEAREST) > 0
        sig, oth = rgb[signal].mean(0), rgb[other].mean(0)
        assert sig.mean() < oth.mean() - 40, (spec.slide_id, sig, oth)
        assert sig[2] / sig[0] > oth[2] / oth[0] + 0.2, (spec.slide_id, sig, oth)


def test_positive_signal_is_distinct_and_small(cohort):
    _check_signal(cohort, demo.design(N, seed=3), seed=3)


def test_truth_masks_match_the_generator(cohort):
    truth = pd.read_csv(cohort / "truth.tsv", sep="\t")
    assert (truth.positive == 1).equals(truth.signal_fraction_of_tissue > 0)
    spec = next(s for s in demo.design(N, seed=3) if s.positive)
    mask = cv2.imread(str(cohort / "truth" / f"{spec.slide_id}.png"), cv2.IMREAD_GRAYSCALE)
    w, h = spec.size(SCALE)
    assert mask.shape == (round(h * spec.mpp / demo.TRUTH_MPP), round(w * spec.mpp / demo.TRUTH_MPP))
    assert set(np.unique(mask)) == {0, 255}


def test_rewrite_replaces_old_demo_but_not_foreign_files(tmp_path):
    out = tmp_path / "c"
    demo.write(out, n_slides=1, seed=0, scale=0.1)
    (out / "slides" / "stale.svs").write_bytes(b"old")
    demo.write(out, n_slides=1, seed=0, scale=0.1)
    assert not (out / "slides" / "stale.svs").exists() and (out / "slides.tsv").is_file()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine.txt"):
        demo.write(out, n_slides=1, seed=0, scale=0.1)
    assert (out / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_slides"):
        demo.plan(0, seed=0)
    with pytest.raises(ValueError, match="scale"):
        demo.write("unused", n_slides=1, seed=0, scale=0)


def test_cli(tmp_path):
    assert demo.cli(["--out", str(tmp_path / "d"), "--n-slides", "2", "--seed", "1", "--scale", "0.1"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "d" / "slides.tsv", sep="\t"), demo.plan(2, seed=1))


# --- the external cohort ("another scanner") -----------------------------------------------------

MAIN_LAYOUTS = {(1, 4, 16), (1, 2, 4, 8)}  # the demo cohort's SVS and generic-TIFF pyramids
EXT_SEED = 1  # the config's (seed 3 lays a pen mark over one slide's signal, spoiling the comparison)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "cohort"
    demo.write_external(out, n_slides=N, seed=EXT_SEED, scale=SCALE)
    return out


def _tissue_colour(folder, specs) -> np.ndarray:
    """Mean RGB of tissue pixels (saturated ones) at 8 µm/px, over the slides without pen marks."""
    pixels = []
    for spec in specs:
        if spec.pen:
            continue
        with openslide.OpenSlide(str(folder / spec.path)) as s:
            level = s.level_count - 1
            rgb = np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))
            f = spec.mpp * s.level_downsamples[level] / 8.0
        small = cv2.resize(rgb, (round(rgb.shape[1] * f), round(rgb.shape[0] * f)),
                           interpolation=cv2.INTER_AREA).astype(int)
        pixels.append(small[small.max(2) - small.min(2) > 40])
    return np.concatenate(pixels).mean(0)


def test_external_plan_is_the_written_sheet(external):
    sheet = pd.read_csv(external / "slides.tsv", sep="\t")
    pd.testing.assert_frame_equal(sheet, demo.plan_external(N, seed=EXT_SEED))
    assert all((external / p).is_file() for p in sheet.path)
    assert sorted(p.name for p in external.iterdir()) == sorted(demo.OWN_ENTRIES)
    truth = pd.read_csv(external / "truth.tsv", sep="\t")
    assert list(truth.slide_id) == list(sheet.slide_id)
    assert (truth.positive == 1).equals(truth.signal_fraction_of_tissue > 0)


def test_external_ids_cases_and_classes():
    main = demo.plan(24, seed=0)
    for n in (2, 3, 6, 8, 25):
        for seed in range(4):
            sheet = demo.plan_external(n, seed)
            ids = set(sheet.slide_id) | set(sheet.case_id)
            assert all(ID_RE.match(i) for i in ids)
            assert all(i.startswith("EXT-S") for i in sheet.slide_id)
            assert all(i.startswith("EXT-C") for i in sheet.case_id)
            assert not ids & (set(main.slide_id) | set(main.case_id) | set(demo.plan(n, seed).case_id))
            assert sheet.groupby("case_id").size().between(1, 2).all(), (n, seed)
            labels = demo.subtype_labels(demo.design_external(n, seed))
            assert set(labels.label) == set(demo.CLASSES), (n, seed)
    positives = (demo.subtype_labels(demo.design_external(6, seed=1)).label == "positive").sum()
    assert 2 <= positives <= 3


def test_external_survival_follows_the_signal():
    specs = demo.design_external(200, seed=0)
    surv = demo.survival_labels(specs, seed=0).merge(demo.subtype_labels(specs), on="case_id")
    by_class = surv.groupby("label").time.mean()
    assert by_class["positive"] < by_class["negative"]
    assert not demo.survival_labels(specs, seed=1).time.equals(surv.time)  # seeded from `seed`


def test_external_sheet_and_labels_validate(external):
    samples = sheets.load_samples(external / "slides.tsv")
    cases = set(samples.case_id)
    sub = sheets.load_labels(external / "labels" / "subtype.csv", "subtype", "classification", cases)
    surv = sheets.load_labels(external / "labels" / "survival.csv", "survival", "survival", cases)
    assert set(sub.label) == set(demo.CLASSES)  # both classes: AUC is defined
    assert set(surv.case_id) == cases and (surv.time > 0).all() and set(surv.event) <= {0, 1}


def test_external_scanner_layout(external, cohort):
    sheet = pd.read_csv(external / "slides.tsv", sep="\t")
    specs = {s.slide_id: s for s in demo.design_external(N, seed=EXT_SEED)}
    layouts, untagged = set(), []
    for row in sheet.itertuples():
        spec = specs[row.slide_id]
        with openslide.OpenSlide(str(external / row.path)) as s:
            props = s.properties
            assert s.dimensions == spec.size(SCALE), row.slide_id
            assert np.allclose(s.level_downsamples, spec.downsamples, rtol=0.02), row.slide_id
            layouts.add(tuple(round(d) for d in s.level_downsamples))
            if spec.kind == "svs":
                assert props["openslide.vendor"] == "aperio"
                assert float(props["openslide.objective-power"]) == 40
            else:
                assert props["openslide.vendor"] == "generic-tiff"
            if "openslide.mpp-x" in props:
                assert float(props["openslide.mpp-x"]) == pytest.approx(spec.mpp) and math.isnan(row.mpp)
            else:  # only the sheet knows this slide's mpp
                untagged.append(row.slide_id)
                assert "openslide.objective-power" not in props and row.mpp == spec.mpp
    assert len(untagged) == 1
    # another scanner: none of the demo cohort's pyramids (checked on the demo's files, too)
    main = set()
    for path in pd.read_csv(cohort / "slides.tsv", sep="\t").path:
        with openslide.OpenSlide(str(cohort / path)) as s:
            main.add(tuple(round(d) for d in s.level_downsamples))
    assert main == MAIN_LAYOUTS
    assert not layouts & main and len(layouts) == 2


def test_external_stain_differs(external, cohort):
    # the cohorts' tissue differs anyway (own random streams), which moves the mean by ~2 units
    main = _tissue_colour(cohort, demo.design(N, seed=3))
    ext = _tissue_colour(external, demo.design_external(N, seed=EXT_SEED))
    assert np.abs(ext - main).max() > 6, (main, ext)
    # the stain is a rendering parameter: same geometry and masks, other colours
    spec = demo.design_external(N, seed=EXT_SEED)[0]
    own, demo_coloured = (demo.render_slide(spec, seed=EXT_SEED, scale=SCALE, stain=st)
                          for st in (None, demo.DEMO_STAIN))
    assert np.array_equal(own.tissue, demo_coloured.tissue) and np.array_equal(own.signal, demo_coloured.signal)
    assert not np.array_equal(own.rgb, demo_coloured.rgb)


def test_external_signal_is_distinct_and_small(external):
    _check_signal(external, demo.design_external(N, seed=EXT_SEED), seed=EXT_SEED)


def test_external_same_seed_same_cohort(external, tmp_path):
    again = tmp_path / "again"
    demo.write_external(again, n_slides=N, seed=EXT_SEED, scale=SCALE)
    for name in ("slides.tsv", "labels/subtype.csv", "labels/survival.csv", "truth.tsv", "demo.json"):
        assert (again / name).read_bytes() == (external / name).read_bytes(), name
    for path in pd.read_csv(external / "slides.tsv", sep="\t").path[:2]:
        assert (again / path).read_bytes() == (external / path).read_bytes(), path


def test_cli_external(tmp_path):
    argv = ["--out", str(tmp_path / "d"), "--n-slides", "2", "--seed", "1", "--scale", "0.1"]
    assert demo.cli(["--external", *argv]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "d" / "slides.tsv", sep="\t"),
                                  demo.plan_external(2, seed=1))
    assert set(pd.read_csv(tmp_path / "d" / "labels" / "subtype.csv").label) == set(demo.CLASSES)
