"""Bag datasets: multi-scale random instance sampling and full bags.

Multi-scale random instance sampling is eq. 2 of W. Tang, R. Qin, H. Fang, F. Zhou, H. Chen, X. Li,
M.-M. Cheng, "Revisiting End-to-End Learning with Slide-level Supervision in Computational
Pathology", NeurIPS 2025, arXiv:2506.02408 ("the paper"; docs/method.md).

A bag is a case: the patches of all its slides. Training draws ⌈s·σ_j⌉ patches per
magnification j uniformly without replacement (with replacement only when the case has fewer),
decodes them to RGB and draws geometric augmentation only: a RandomResizedCrop box and flips per
patch. Loader workers do what only a CPU can (LMDB get + JPEG decode) and ship uint8 patches at
their stored size plus the boxes; `transforms.resized_crops` then crops, flips, resizes and
normalises (ImageNet RGB statistics) the whole bag in one batched `grid_sample` on the training device.
On a GPU that costs nothing, and the loader runs at the speed of decoding (bench/loader.py).

Every draw comes from a generator seeded by (seed, epoch, position in the epoch's order), so the
same config gives the same patches and boxes whatever the number of loader workers, and a bag
drawn twice in an epoch (minority oversampling) gets two different samples. Stores open lazily,
once per worker process (`LmdbReader`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from .io import read_records
from .store import LmdbReader
from .transforms import crop_boxes

logger = logging.getLogger(__name__)


@dataclass
class Bag:
    """One case: its slides' stores per magnification, slides in slide-id order."""

    case_id: str
    slides: list[str]
    stores: dict[int, list[LmdbReader]] = field(default_factory=dict)

    def n_patches(self, mag: int) -> int:
        return sum(len(s) for s in self.stores.get(mag, []))


def load_bags(slides_tsv: str | Path, rows: list[str | Path], cases: list[str]) -> dict[str, Bag]:
    """Bags of ``cases`` from the manifest rows (per-slide JSONs or shard tables); slides that are
    not `ok` are skipped, logged.

    A case none of whose slides has a usable store is left out with a warning naming it.
    """
    sheet = pd.read_csv(slides_tsv, sep="\t", dtype={"slide_id": str, "case_id": str})
    case_of = dict(zip(sheet["slide_id"], sheet["case_id"]))
    bags = {c: Bag(c, []) for c in cases}
    problems: dict[str, list[str]] = {}
    # a fixed slide order whatever order the rule lists rows in, per-slide files or shard tables
    for row in sorted(read_records(rows), key=lambda r: (f"{r['magnification']}x", r["slide_id"])):
        case = case_of.get(row["slide_id"])
        if case not in bags:
            continue
        if row["status"] != "ok" or not row.get("n_patches"):
            why = f"{row['slide_id']} at {row['magnification']}x: {row['status']} {row.get('message') or ''}"
            problems.setdefault(case, []).append(why.strip())
            logger.info("skip slide %s", why)
            continue
        bag = bags[case]
        if row["slide_id"] not in bag.slides:
            bag.slides.append(row["slide_id"])
        bag.stores.setdefault(int(row["magnification"]), []).append(LmdbReader(row["lmdb"]))
    for case in [c for c, b in bags.items() if not b.stores]:
        logger.warning("case %s is skipped: no slide has usable patches at any magnification (%s)",
                       case, "; ".join(problems.get(case, ["no manifest row"])))
        del bags[case]
    return bags


def scale_counts(n_instances: int, ratios: list[float]) -> list[int]:
    """ŝ_j = ⌈s·σ_j⌉ (eq. 2 of the paper); the tolerance keeps 0.3·10 from rounding up to 4."""
    return [math.ceil(n_instances * r - 1e-9) for r in ratios]


class MultiScaleBagDataset(Dataset):
    """Training bags of exactly Σ⌈s·σ_j⌉ patches, in the order set by :meth:`set_epoch`.

    Item ``i`` of an epoch is bag ``order[i]``: (uint8 patches [S, P, P, 3] at the stored size P,
    crop boxes [S, 6] for `resized_crops`, target, bag index).
    """

    def __init__(self, bags: list[Bag], targets: list[torch.Tensor], n_instances: int,
                 magnifications: list[int], ratios: list[float], input_size: int, seed: int) -> None:
        if len(magnifications) != len(ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"sampling: {len(ratios)} ratios for {len(magnifications)} magnifications "
                             f"summing to {sum(ratios):g}; give one ratio per magnification, summing to 1")
        self.bags, self.targets = bags, targets
        self.mags, self.counts = list(magnifications), scale_counts(n_instances, ratios)
        self.input_size, self.seed = input_size, seed
        for bag in bags:
            if not any(bag.n_patches(m) for m in self.mags):
                raise ValueError(f"case {bag.case_id}: no patches at the sampling magnifications "
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
        rng = np.random.default_rng([self.seed, self.epoch, position])
        bag, picks = self.bags[self.order[position]], []
        for m, count in self.scale_counts_of(bag).items():
            sizes = [len(s) for s in bag.stores[m]]
            total = sum(sizes)
            flat = rng.choice(total, size=count, replace=total < count)
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
        rng = np.random.default_rng([self.seed, self.epoch, position, 1])
        boxes = crop_boxes(len(picks), *patches.shape[1:3], rng)
        return patches, torch.from_numpy(boxes), self.targets[index], index


def _bag_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bag memory; in a loader worker it is shared memory from the start, so handing the
    bag to the main process copies nothing (see `collate_bags`)."""
    out = torch.empty(shape, dtype=torch.uint8)
    return out.share_memory_() if get_worker_info() is not None else out


def collate_bags(items: list) -> list:
    """`default_collate`, except that a batch of one bag is a view, not a copy of 10^8 bytes."""
    if len(items) == 1:
        return [x.unsqueeze(0) if isinstance(x, torch.Tensor) else default_collate([x]) for x in items[0]]
    return default_collate(items)


def _group(picks: list[tuple[int, int, int]]) -> dict[tuple[int, int], list[int]]:
    """(magnification, store) → positions in the bag, so each store is read in one go."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (m, s, _) in enumerate(picks):
        groups.setdefault((m, s), []).append(k)
    return groups


def iter_full_bag(bag: Bag, magnification: int, chunk: int):
    """Every patch of one magnification, slide by slide, in chunks.

    Yields (slide_id, coords [n, 2], uint8 [n, P, P, 3]); `transforms.model_inputs` on the device
    makes them model inputs exactly as in training, minus the randomness.
    """
    for store in bag.stores.get(magnification, []):
        slide, coords = store.meta["slide_id"], store.coords
        for start in range(0, len(store), chunk):
            stop = min(start + chunk, len(store))
            rgb = np.stack(list(store.iter_rgb(range(start, stop))))
            yield slide, coords[start:stop], torch.from_numpy(rgb)
