"""Bag datasets: multi-scale random instance sampling (paper eq. 2), full bags, feature bags.

A bag is a case: the patches of all its slides. Training draws ⌈s·σ_j⌉ patches per
magnification j uniformly without replacement (with replacement only when the case has fewer),
decodes RGB, applies geometric augmentation only (flips, RandomResizedCrop) and ImageNet RGB
normalisation. Every draw comes from a generator seeded by (seed, epoch, bag), so the same
config gives the same patches whatever the number of loader workers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .io import read_json
from .preprocess.store import LmdbReader

logger = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass
class Bag:
    """One case: its slides' stores per magnification."""

    case_id: str
    slides: list[str]
    stores: dict[int, list[LmdbReader]] = field(default_factory=dict)

    def n_patches(self, mag: int) -> int:
        return sum(len(s) for s in self.stores.get(mag, []))


def load_bags(slides_tsv: str | Path, rows: list[str | Path], cases: list[str]) -> dict[str, Bag]:
    """Bags of ``cases`` from the manifest rows; slides that are not `ok` are skipped, logged."""
    sheet = pd.read_csv(slides_tsv, sep="\t", dtype={"slide_id": str, "case_id": str})
    wanted = set(cases)
    bags = {c: Bag(c, []) for c in cases}
    case_of = dict(zip(sheet["slide_id"], sheet["case_id"]))
    for path in rows:
        row = read_json(path)
        case = case_of.get(row["slide_id"])
        if case not in wanted:
            continue
        if row["status"] != "ok":
            logger.info("skip slide %s at %sx: %s (%s)", row["slide_id"], row["magnification"],
                        row["status"], row.get("message") or "")
            continue
        bag = bags[case]
        if row["slide_id"] not in bag.slides:
            bag.slides.append(row["slide_id"])
        bag.stores.setdefault(int(row["magnification"]), []).append(LmdbReader(row["lmdb"]))
    empty = [c for c, b in bags.items() if not b.stores]
    for c in empty:
        logger.warning("case %s has no usable patches at any magnification; it is left out", c)
        del bags[c]
    return bags


def scale_counts(n_instances: int, ratios: list[float]) -> list[int]:
    """ŝ_j = ⌈s·σ_j⌉ (paper eq. 2)."""
    return [math.ceil(n_instances * r - 1e-9) for r in ratios]


def to_tensor(patches: np.ndarray) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] → normalised float [N, 3, H, W]."""
    x = (patches.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def augment(rgb: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Flips and RandomResizedCrop (scale 0.5–1, ratio 3/4–4/3); geometry only, no colour."""
    h, w = rgb.shape[:2]
    area = h * w * rng.uniform(0.5, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, int(round(math.sqrt(area * aspect))))
    ch = min(h, int(round(math.sqrt(area / aspect))))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = cv2.resize(rgb[y0:y0 + ch, x0:x0 + cw], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out)


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


class MultiScaleBagDataset(Dataset):
    """Training bags of exactly Σ⌈s·σ_j⌉ patches: item → (patches [S,3,H,W], target, index)."""

    def __init__(self, bags: list[Bag], targets: list[torch.Tensor], n_instances: int,
                 magnifications: list[int], ratios: list[float], input_size: int, seed: int) -> None:
        self.bags, self.targets = bags, targets
        self.mags, self.counts = magnifications, scale_counts(n_instances, ratios)
        self.input_size, self.seed, self.epoch = input_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    def sample(self, index: int) -> list[tuple[int, int, int]]:
        """(magnification, store, patch) triples drawn for bag ``index`` in this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        bag, picks = self.bags[index], []
        counts = dict(zip(self.mags, self.counts))
        available = [m for m in self.mags if bag.n_patches(m) > 0]
        for m in self.mags:  # a scale the case lacks gives its share to the first available one
            if m not in available:
                counts[available[0]] += counts.pop(m)
        for m in available:
            sizes = [len(s) for s in bag.stores[m]]
            total = sum(sizes)
            flat = rng.choice(total, size=counts[m], replace=total < counts[m])
            offsets = np.cumsum([0] + sizes)
            store = np.searchsorted(offsets, flat, side="right") - 1
            picks += [(m, int(s), int(f - offsets[s])) for s, f in zip(store, flat)]
        return picks

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        bag = self.bags[index]
        patches = np.stack([augment(bag.stores[m][s].get_rgb(i), self.input_size, rng)
                            for m, s, i in self.sample(index)])
        return to_tensor(patches), self.targets[index], index


def iter_full_bag(bag: Bag, magnification: int, input_size: int, chunk: int):
    """All patches of the evaluation magnification, in chunks: yields (slide_id, coords, tensor)."""
    for slide, store in zip(bag.slides, bag.stores.get(magnification, [])):
        coords = store.coords
        for start in range(0, len(store), chunk):
            stop = min(start + chunk, len(store))
            rgb = np.stack([resize(store.get_rgb(i), input_size) for i in range(start, stop)])
            yield store.meta["slide_id"], coords[start:stop], to_tensor(rgb)


def balanced_order(strata: np.ndarray, rng: np.random.Generator, oversample: bool) -> np.ndarray:
    """An epoch's bag order; with ``oversample`` minority strata are drawn up to the majority size."""
    index = np.arange(len(strata))
    if oversample and len(np.unique(strata)) > 1:
        groups = [index[strata == s] for s in np.unique(strata)]
        top = max(len(g) for g in groups)
        index = np.concatenate([np.concatenate([g, rng.choice(g, top - len(g), replace=True)])
                                if len(g) < top else g for g in groups])
    return rng.permutation(index)
