"""Bag datasets: multi-scale random instance sampling and full bags.

Multi-scale random instance sampling is eq. 2 of W. Tang, R. Qin, H. Fang, F. Zhou, H. Chen, X. Li,
M.-M. Cheng, "Revisiting End-to-End Learning with Slide-level Supervision in Computational
Pathology", NeurIPS 2025, arXiv:2506.02408 ("the paper"; docs/method.md).

A bag is a slide or a case (all its slides), the task's `bag` unit. Training draws ŝ_j patches per
magnification j (`sampling.scale_counts`: Σ ŝ_j = s) uniformly without replacement; a bag with
fewer patches than that gives each of them once — a shorter bag, padded and masked when batched
(`collate_bags`), so no patch counts twice in the attention. Patches are decoded to RGB and get
geometric augmentation only: a RandomResizedCrop box, optional flips and shift per patch. Loader
workers do what only a CPU can (LMDB get + JPEG decode) and ship uint8 patches at their stored size
plus the boxes; `transforms.resized_crops` then crops, flips, resizes and
normalises (ImageNet RGB statistics) the whole bag in one batched `grid_sample` on the training device.
On a GPU that costs nothing, and the loader runs at the speed of decoding (bench/loader.py).

Every draw comes from a generator seeded by (seed, epoch, position in the epoch's order), so the
same config gives the same patches and boxes whatever the number of loader workers, and a bag
drawn twice in an epoch (minority oversampling) gets two different samples. Stores open lazily,
once per worker process (`LmdbReader`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from e2epath.core import seeds
from e2epath.core.io import read_records
from e2epath.core.vocabulary import BAG_UNITS
from e2epath.data.decoding import PatchBatches
from e2epath.data.sampling import scale_counts
from e2epath.data.transforms import crop_boxes
from e2epath.preprocess.store import LmdbReader

logger = logging.getLogger(__name__)




@dataclass
class Bag:
    """One unit of prediction — a slide, or a case with all its slides — and its stores per
    magnification (slides in slide-id order)."""

    unit_id: str
    case_id: str
    slides: list[str] = field(default_factory=list)
    stores: dict[int, list[LmdbReader]] = field(default_factory=dict)

    def n_patches(self, mag: int) -> int:
        return sum(len(s) for s in self.stores.get(mag, []))


def load_bags(slides_tsv: str | Path, rows: list[str | Path], cases: list[str], unit: str = "case") -> dict[str, Bag]:
    """Bags of the slides of ``cases`` from the manifest rows (per-slide JSONs or shard tables),
    one per case or one per slide (``unit``); slides that are not `ok` are skipped, logged.

    A bag none of whose slides has a usable store is left out with a warning naming it.
    """
    if unit not in BAG_UNITS:
        raise ValueError(f"bag unit {unit!r} is not one of {BAG_UNITS}")
    sheet = pd.read_csv(slides_tsv, sep="\t", dtype={"slide_id": str, "case_id": str})
    wanted = set(cases)
    case_of = {s: c for s, c in zip(sheet["slide_id"], sheet["case_id"]) if c in wanted}
    unit_of = case_of if unit == "case" else {s: s for s in case_of}
    bags = {u: Bag(u, case_of[s]) for s, u in sorted(unit_of.items(), key=lambda x: (case_of[x[0]], x[1]))}
    problems: dict[str, list[str]] = {}
    # a fixed slide order whatever order the rule lists rows in, per-slide files or shard tables
    for row in sorted(read_records(rows), key=lambda r: (f"{r['magnification']}x", r["slide_id"])):
        if row["slide_id"] not in unit_of:
            continue
        bag = bags[unit_of[row["slide_id"]]]
        if row["status"] != "ok" or not row.get("n_patches"):
            why = f"{row['slide_id']} at {row['magnification']}x: {row['status']} {row.get('message') or ''}"
            problems.setdefault(bag.unit_id, []).append(why.strip())
            logger.info("skip slide %s", why)
            continue
        if row["slide_id"] not in bag.slides:
            bag.slides.append(row["slide_id"])
        bag.stores.setdefault(int(row["magnification"]), []).append(LmdbReader(row["lmdb"]))
    for u in [u for u, b in bags.items() if not b.stores]:
        logger.warning("%s %s is skipped: no slide has usable patches at any magnification (%s)",
                       unit, u, "; ".join(problems.get(u, ["no manifest row"])))
        del bags[u]
    return bags


class MultiScaleBagDataset(Dataset):
    """Training bags of (at most) s = Σ ŝ_j patches, in the order set by :meth:`set_epoch`.

    Item ``i`` of an epoch is bag ``order[i]``: (uint8 patches [S, P, P, 3] at the stored size P,
    crop boxes [S, 6] for `transforms.resized_crops`, target, bag index); S = s unless the bag holds
    fewer patches at a magnification than it asks for, which then gives each of them once.
    ``augment``: {hflip, vflip, crop_scale, translate} (`transforms.crop_boxes`).
    """

    def __init__(self, bags: list[Bag], targets: list[torch.Tensor], n_instances: int,
                 magnifications: list[int], ratios: list[float], input_size: int, seed: int,
                 augment: dict) -> None:
        if len(magnifications) != len(ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"sampling: {len(ratios)} ratios for {len(magnifications)} magnifications "
                             f"summing to {sum(ratios):g}; give one ratio per magnification, summing to 1")
        self.bags, self.targets = bags, targets
        self.mags, self.counts = list(magnifications), scale_counts(n_instances, ratios)
        self.input_size, self.seed = input_size, seed
        self.augment = dict(augment)
        for bag in bags:
            if not any(bag.n_patches(m) for m in self.mags):
                raise ValueError(f"{bag.unit_id} (case {bag.case_id}): no patches at the sampling magnifications "
                                 f"{self.mags}; drop it from training or add a magnification")
        self.set_epoch(0)

    def set_epoch(self, epoch: int, order: np.ndarray | None = None) -> None:
        """The epoch (part of every draw's seed) and its bag order (default: each bag once)."""
        self.epoch = epoch
        self.order = np.arange(len(self.bags)) if order is None else np.asarray(order, dtype=int)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def bag_size(self) -> int:
        return sum(self.counts)

    def scale_counts_of(self, bag: Bag) -> dict[int, int]:
        """ŝ_j of this bag; a scale the case lacks gives its share to the first one it has."""
        counts = dict(zip(self.mags, self.counts))
        available = [m for m in self.mags if bag.n_patches(m) > 0]
        for m in self.mags:
            if m not in available:
                counts[available[0]] += counts.pop(m)
        return counts

    def sample(self, position: int) -> list[tuple[int, int, int]]:
        """(magnification, store, patch) triples of item ``position`` of this epoch."""
        rng = seeds.bag_rng(self.seed, self.epoch, position)
        bag, picks = self.bags[self.order[position]], []
        for m, count in self.scale_counts_of(bag).items():
            sizes = [len(s) for s in bag.stores[m]]
            total = sum(sizes)
            flat = rng.choice(total, size=min(count, total), replace=False)  # a short bag: each patch once
            offsets = np.cumsum([0] + sizes)
            store = np.searchsorted(offsets, flat, side="right") - 1
            picks += [(m, int(s), int(f - offsets[s])) for s, f in zip(store, flat)]
        return picks

    def __getitem__(self, position: int):
        index = int(self.order[position])
        bag, picks = self.bags[index], self.sample(position)
        patches = None
        for (m, s), ks in _group(picks).items():
            for k, rgb in zip(ks, bag.stores[m][s].iter_rgb([picks[k][2] for k in ks])):
                if patches is None:
                    patches = _bag_buffer((len(picks), *rgb.shape))
                elif rgb.shape != patches.shape[1:]:
                    raise ValueError(f"case {bag.case_id}: {bag.stores[m][s].path} holds {rgb.shape[1]}-px "
                                     f"patches, other stores of the case {patches.shape[2]}-px; every store of a "
                                     "run has preprocess.patch_size: rerun its patch jobs")
                patches.numpy()[k] = rgb
        rng = seeds.bag_rng(self.seed, self.epoch, position, 1)
        boxes = crop_boxes(len(picks), *patches.shape[1:3], rng, **self.augment)
        return patches, torch.from_numpy(boxes), self.targets[index], index


def _bag_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bag memory; in a loader worker it is shared memory from the start, so handing the
    bag to the main process copies nothing (see `collate_bags`)."""
    out = torch.empty(shape, dtype=torch.uint8)
    return out.share_memory_() if get_worker_info() is not None else out


def collate_bags(items: list) -> list:
    """(patches [B, S, P, P, 3], boxes [B, S, 6], targets, indices, mask [B, S] or None): bags of
    different lengths are zero-padded to the longest, ``mask`` marking the real patches (None when
    every bag is full). A batch of one bag is a view, not a copy of 10^8 bytes."""
    if len(items) == 1:
        return [x.unsqueeze(0) if isinstance(x, torch.Tensor) else default_collate([x]) for x in items[0]] + [None]
    lengths = [len(item[0]) for item in items]
    if len(set(lengths)) == 1:
        return default_collate(items) + [None]
    longest = max(lengths)
    patches = torch.zeros((len(items), longest, *items[0][0].shape[1:]), dtype=torch.uint8)
    boxes = torch.zeros((len(items), longest, items[0][1].shape[1]), dtype=items[0][1].dtype)
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for b, (p, box, _, _) in enumerate(items):
        patches[b, :len(p)], boxes[b, :len(p)], mask[b, :len(p)] = p, box, True
        boxes[b, len(p):] = box[:1]  # padding boxes: any valid box (their pixels are masked out)
    rest = default_collate([item[2:] for item in items])
    return [patches, boxes, *rest, mask]


def _group(picks: list[tuple[int, int, int]]) -> dict[tuple[int, int], list[int]]:
    """(magnification, store) → positions in the bag, so each store is read in one go."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (m, s, _) in enumerate(picks):
        groups.setdefault((m, s), []).append(k)
    return groups


def iter_full_bag(bag: Bag, magnification: int, chunk: int, decode_threads: int = 0):
    """Every patch of one magnification, slide by slide, in chunks.

    Yields (slide_id, coords [n, 2], uint8 [n, P, P, 3]); `transforms.model_inputs` on the device
    makes them model inputs exactly as in training, minus the randomness. With ``decode_threads``
    the next chunks are decoded in background threads (`decoding.PatchBatches`), in order.
    """
    for store in bag.stores.get(magnification, []):
        slide, coords = store.meta["slide_id"], store.coords
        for start, rgb in zip(range(0, len(store), chunk), PatchBatches(store, chunk, decode_threads)):
            yield slide, coords[start:start + len(rgb)], rgb
