"""Bag datasets on real LMDB stores written with `LmdbWriter` (tiny 32-px synthetic patches; the
cohort writer is tests/helpers.py's, shared with test_train.py)."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from e2epath.data.bags import (
    Bag,
    MultiScaleBagDataset,
    collate_bags,
    iter_full_bag,
    load_bags,
)
from e2epath.data.sampling import scale_counts
from e2epath.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_boxes,
    eval_boxes,
    full_boxes,
    model_inputs,
    normalize,
    resized_crops,
)
from e2epath.preprocess.store import LmdbReader, LmdbWriter
from helpers import write_store, write_store_cohort

PATCH = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cohort")
    sizes = {(2, 20): 3, (3, 10): 0}  # case 2: too few 20x patches; case 3: no 10x patches
    return write_store_cohort(root, n_cases=6, sizes=sizes, failed=("CASE-05",))


AUGMENT = {"hflip": True, "vflip": True, "crop_scale": 0.5, "translate": 0.0}


def dataset_of(cohort, n_instances=10, ratios=(0.3, 0.7), seed=0, input_size=PATCH, unit="case",
               augment=AUGMENT) -> MultiScaleBagDataset:
    bags = load_bags(cohort["slides"], cohort["rows"], cohort["cases"], unit)
    ordered = [bags[c] for c in sorted(bags)]
    return MultiScaleBagDataset(ordered, [torch.tensor(i) for i in range(len(ordered))], n_instances,
                                [10, 20], list(ratios), input_size, seed, augment)


def test_scale_counts_floor_the_secondary_scales_and_give_the_rest_to_the_main_one():
    assert scale_counts(10, [0.3, 0.7]) == [3, 7]
    assert scale_counts(16, [1 / 3, 2 / 3]) == [6, 10]  # ⌊10.67⌋ = 10 at the second; the first takes 16 - 10
    assert scale_counts(512, [0.75, 0.25]) == [384, 128]  # the authors' s // mul_scale_ratio (4)
    assert scale_counts(768, [0.9, 0.1]) == [692, 76]  # 768 // 10 = 76
    assert scale_counts(512, [1.0]) == [512]


def test_sampling_counts_per_scale_and_replacement(cohort):
    ds = dataset_of(cohort)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for pos, bag in enumerate(ds.bags):
            picks = ds.sample(pos)
            by_mag = Counter(m for m, _, _ in picks)
            patches = {m: [(s, i) for mm, s, i in picks if mm == m] for m in by_mag}
            if bag.case_id == "CASE-03":  # no 10x patches: the 20x scale takes the whole bag
                assert by_mag == {20: 10}
                continue
            if bag.case_id == "CASE-02":  # 3 patches at 20x for 7 draws: each of them once, a shorter bag
                assert by_mag == {10: 3, 20: 3} and len(set(patches[20])) == 3
                continue
            assert by_mag == {10: 3, 20: 7}  # enough patches: without replacement
            assert len(set(patches[10])) == 3 and len(set(patches[20])) == 7
            for m, s, i in picks:
                assert 0 <= i < len(bag.stores[m][s])


def test_all_slides_of_a_case_form_one_bag(cohort):
    ds = dataset_of(cohort)
    pos = next(i for i, b in enumerate(ds.bags) if b.case_id == "CASE-01")
    assert len(ds.bags[pos].slides) == 2 and ds.bags[pos].n_patches(20) == 24
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        seen |= {s for _, s, _ in ds.sample(pos)}
    assert seen == {0, 1}


def test_draws_are_seeded_by_seed_epoch_and_position(cohort):
    a, b, c = dataset_of(cohort), dataset_of(cohort), dataset_of(cohort, seed=1)
    assert [a.sample(i) for i in range(len(a))] == [b.sample(i) for i in range(len(b))]
    assert torch.equal(a[0][0], b[0][0])
    assert [a.sample(i) for i in range(len(a))] != [c.sample(i) for i in range(len(c))]
    first = a.sample(0)
    a.set_epoch(1)
    assert a.sample(0) != first
    # a bag twice in one epoch (oversampling) gets two different samples
    a.set_epoch(0, np.array([0, 0]))
    assert a.sample(0) != a.sample(1)


def test_items_are_rgb_uint8_with_crop_boxes(cohort, tmp_path):
    red = np.zeros((PATCH, PATCH, 3), np.uint8)
    red[..., 0] = 255
    write_store(tmp_path, "RED", 10, [red] * 4)
    bag = Bag("RED", "RED", ["RED"], {10: [LmdbReader(tmp_path / "lmdb/10x/RED.lmdb")]})
    ds = MultiScaleBagDataset([bag], [torch.tensor(0)], 4, [10], [1.0], 24, 0, AUGMENT)
    x, boxes, _, _ = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (4, PATCH, PATCH, 3)  # stored size; resized on the device
    assert x[..., 0].min() > 240 and x[..., 1:].max() < 15  # RGB order, JPEG tolerance
    assert boxes.shape == (4, 6)
    w, h = boxes[:, 2], boxes[:, 3]
    assert ((w * h >= 0.5 * PATCH**2 - 2 * PATCH) & (w <= PATCH) & (h <= PATCH)).all()
    assert ((boxes[:, 0] + w <= PATCH) & (boxes[:, 1] + h <= PATCH)).all()
    y = resized_crops(x, boxes, 24)
    assert y.shape == (4, 3, 24, 24)
    expected = (torch.tensor([255.0, 0, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), expected, atol=0.1, rtol=0)


def test_resized_crops_cut_flip_resize_and_normalise():
    x = torch.randint(0, 256, (3, PATCH, PATCH, 3), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    ref = ref.permute(0, 3, 1, 2)
    torch.testing.assert_close(normalize(x), ref)
    torch.testing.assert_close(resized_crops(x, full_boxes(3, PATCH, PATCH), PATCH), ref, atol=1e-5, rtol=0)
    box = torch.tensor([[8, 4, 16, 16, 0, 0], [8, 4, 16, 16, 1, 0], [8, 4, 16, 16, 0, 1]], dtype=torch.float32)
    out = resized_crops(x, box, 16)  # a 16-px box at 16 px: exactly those pixels
    crop = ref[:, :, 4:20, 8:24]
    torch.testing.assert_close(out[0], crop[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], crop[1].flip(-1), atol=1e-5, rtol=0)  # horizontal flip
    torch.testing.assert_close(out[2], crop[2].flip(-2), atol=1e-5, rtol=0)  # vertical flip
    half = resized_crops(x[:1], full_boxes(1, PATCH, PATCH), PATCH // 2)  # 2x down: mean of 2x2 blocks
    torch.testing.assert_close(half[0], torch.nn.functional.avg_pool2d(ref[:1], 2)[0], atol=1e-5, rtol=0)


def test_augmentation_is_geometric_only():
    rng = np.random.default_rng(0)
    flat = torch.tensor([200, 120, 60], dtype=torch.uint8).expand(20, PATCH, PATCH, 3).contiguous()
    boxes = torch.from_numpy(crop_boxes(20, PATCH, PATCH, rng, hflip=True, vflip=True, crop_scale=0.08,
                                        translate=0.0))
    out = resized_crops(flat, boxes, 24)  # a constant colour stays exactly that colour: no colour jitter
    torch.testing.assert_close(out, normalize(flat[:, :24, :24]), atol=1e-5, rtol=0)
    assert 0 < boxes[:, 4].sum() < 20 and 0 < boxes[:, 5].sum() < 20  # both flips, sometimes
    assert len({tuple(b[:4].tolist()) for b in boxes}) == 20  # every patch its own crop


def test_workers_give_the_same_samples_as_the_main_process(cohort):
    ds = dataset_of(cohort)
    ds.set_epoch(3, np.array([4, 0, 1, 2, 3, 0]))

    def collect(workers):
        return [(x, b, i) for x, b, _, i, _ in DataLoader(ds, batch_size=2, num_workers=workers,
                                                          collate_fn=collate_bags)]

    main, parallel = collect(0), collect(2)
    assert len(main) == len(parallel) == 3
    for (xa, ba, ia), (xb, bb, ib) in zip(main, parallel):
        assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ba, bb)


def test_failed_case_is_skipped_with_a_message(cohort, caplog):
    with caplog.at_level(logging.INFO, logger="e2epath.data"):
        bags = load_bags(cohort["slides"], cohort["rows"], cohort["cases"])
    assert "CASE-05" not in bags and set(bags) == set(cohort["cases"]) - {"CASE-05"}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CASE-05" in m and "skipped" in m and "unreadable" in m for m in warning)


def test_full_bag_yields_every_patch_once_with_coords(cohort):
    bags = load_bags(cohort["slides"], cohort["rows"], cohort["cases"])
    chunks = list(iter_full_bag(bags["CASE-01"], 20, chunk=5))
    slides = [s for s, _, _ in chunks]
    assert sorted(set(slides)) == ["S010", "S011"]
    coords = np.concatenate([c for _, c, _ in chunks])
    assert sum(len(x) for _, _, x in chunks) == len(coords) == 24
    for slide in ("S010", "S011"):  # per slide: every patch, in store order
        xs = np.concatenate([c for s, c, _ in chunks if s == slide])
        assert xs[:, 0].tolist() == [i * PATCH for i in range(12)]
    first = bags["CASE-01"].stores[20][0].get_rgb(0)
    assert torch.equal(chunks[0][2][0], torch.from_numpy(first))


def test_bad_sampling_config_is_a_clear_error(cohort):
    with pytest.raises(ValueError, match="ratios"):
        dataset_of(cohort, ratios=(0.5, 0.6))


def test_a_corrupt_patch_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.lmdb"
    with LmdbWriter(path, capacity_bytes=1 << 20) as writer:
        writer.add(b"not a jpeg", (0, 0), 1.0)
        writer.close({"slide_id": "BAD", "magnification": 10, "status": "ok"})
    bag = Bag("BAD", "BAD", ["BAD"], {10: [LmdbReader(path)]})
    ds = MultiScaleBagDataset([bag], [torch.tensor(0)], 2, [10], [1.0], 16, 0, AUGMENT)
    with pytest.raises(ValueError, match=r"bad\.lmdb patch 0: .*re-run its patch job"):
        ds[0]


def test_stores_of_different_patch_sizes_in_one_bag_are_an_error(tmp_path):
    """Every store of a run has preprocess.patch_size: a bag mixing sizes says which store and what to do."""
    rng = np.random.default_rng(0)
    write_store(tmp_path, "A", 10, [patch_image_of(rng, 32)] * 3)
    write_store(tmp_path, "A", 20, [patch_image_of(rng, 48)] * 3)
    bag = Bag("C", "C", ["A"], {m: [LmdbReader(tmp_path / f"lmdb/{m}x/A.lmdb")] for m in (10, 20)})
    ds = MultiScaleBagDataset([bag], [torch.tensor(0)], 4, [10, 20], [0.5, 0.5], 32, 0, AUGMENT)
    with pytest.raises(ValueError, match=r"case C: .*20x/A\.lmdb holds 48-px patches.*rerun its patch jobs"):
        ds[0]


def patch_image_of(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_short_bags_are_padded_and_masked_never_repeated(cohort):
    """A bag with fewer patches than it asks for gives each once; a batch pads it, the mask marks
    the real patches (the authors repeat patches instead: docs/recipe.md)."""
    ds = dataset_of(cohort)
    short = next(i for i, b in enumerate(ds.bags) if b.case_id == "CASE-02")
    full = next(i for i, b in enumerate(ds.bags) if b.case_id == "CASE-01")
    ds.set_epoch(0, np.array([full, short]))
    items = [ds[0], ds[1]]
    assert len(items[0][0]) == 10 and len(items[1][0]) == 6
    patches, boxes, targets, index, mask = collate_bags(items)
    assert patches.shape[:2] == (2, 10) and boxes.shape == (2, 10, 6)
    assert mask.tolist() == [[True] * 10, [True] * 6 + [False] * 4]
    assert torch.equal(patches[1, :6], items[1][0]) and not patches[1, 6:].any()
    assert index.tolist() == [full, short] and targets.tolist() == [full, short]
    assert collate_bags([items[0], items[0]])[-1] is None  # full bags: no mask
    assert collate_bags([items[1]])[-1] is None  # one bag alone is all real patches


def test_slide_bags_are_one_per_slide_with_their_case(cohort):
    slides = load_bags(cohort["slides"], cohort["rows"], cohort["cases"], unit="slide")
    cases = load_bags(cohort["slides"], cohort["rows"], cohort["cases"], unit="case")
    assert set(slides) == {s for b in cases.values() for s in b.slides}
    assert {slides[s].case_id for s in cases["CASE-01"].slides} == {"CASE-01"}
    assert [slides[s].slides for s in cases["CASE-01"].slides] == [[s] for s in cases["CASE-01"].slides]
    assert sum(slides[s].n_patches(20) for s in cases["CASE-01"].slides) == cases["CASE-01"].n_patches(20)
    with pytest.raises(ValueError, match="bag unit 'patient'"):
        load_bags(cohort["slides"], cohort["rows"], cohort["cases"], unit="patient")


def test_crop_boxes_switch_flips_and_shifts_without_changing_other_draws():
    def boxes(**kw):
        args = {"hflip": False, "vflip": False, "crop_scale": 0.25, "translate": 0.0, **kw}
        return crop_boxes(200, 256, 256, np.random.default_rng(3), **args)

    plain, flipped, shifted = boxes(), boxes(hflip=True, vflip=True), boxes(translate=100 / 256)
    assert not plain[:, 4:].any() and 0 < flipped[:, 4].mean() < 1 and 0 < flipped[:, 5].mean() < 1
    np.testing.assert_array_equal(plain[:, :4], flipped[:, :4])  # the same crops, flipped or not
    np.testing.assert_array_equal(plain[:, 2:4], shifted[:, 2:4])  # the same sizes, shifted
    area = plain[:, 2] * plain[:, 3] / 256**2
    assert area.min() >= 0.25 - 0.02 and area.max() <= 1
    assert (plain[:, 0] >= 0).all() and (plain[:, 0] + plain[:, 2] <= 256).all()
    shift = np.abs(shifted[:, :2] - plain[:, :2])
    assert shift.max() <= 100 and shift.max() > 50 and (shifted[:, 0] < 0).any()  # past the patch edge


def test_a_shifted_crop_fills_black_past_the_patch():
    x = torch.full((1, PATCH, PATCH, 3), 200, dtype=torch.uint8)
    box = torch.tensor([[-16, 0, PATCH, PATCH, 0, 0]], dtype=torch.float32)  # content moved 16 px right
    out = resized_crops(x, box, PATCH, fill="black")[0]
    black = normalize(torch.zeros(1, 1, 1, 3, dtype=torch.uint8))[0, :, 0, 0]
    grey = normalize(torch.full((1, 1, 1, 3), 200, dtype=torch.uint8))[0, :, 0, 0]
    torch.testing.assert_close(out[:, :, :15], black[:, None, None].expand(3, PATCH, 15), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, 17:], grey[:, None, None].expand(3, PATCH, PATCH - 17), atol=1e-5, rtol=0)


def test_evaluation_inputs_are_the_centre_crop_or_the_whole_patch():
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    ref = normalize(x)
    torch.testing.assert_close(model_inputs(x, 48, "center"), ref[:, :, 8:56, 8:56], atol=1e-5, rtol=0)
    torch.testing.assert_close(model_inputs(x, 32, "whole"), torch.nn.functional.avg_pool2d(ref, 2),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(model_inputs(x, 64, "center"), ref, atol=1e-4, rtol=0)  # not larger: whole
    assert eval_boxes(1, 256, 256, 224, "center").tolist() == [[16, 16, 224, 224, 0, 0]]  # CenterCrop(224)
