"""Bag loader throughput vs the raw floor: LMDB get + JPEG decode of the very same keys.

The training dataset (`MultiScaleBagDataset`) adds sampling, RGB decode into one uint8 bag array
and crop boxes (the crop / flip / resize itself runs batched on the training device, see
`transforms.resized_crops`); the baseline only gets and decodes each sampled key. A second floor,
"raw into fresh bag arrays", also copies each decoded patch into a newly allocated bag, which any
loader must do: it separates the cost of fresh memory (page faults; expensive in some sandboxes
and VMs) from the dataset's own overhead. Everything is timed in the same run, per worker (one
process) and with 2 worker processes, and printed as a Markdown table with ratios (goal: dataset
≥ 0.85× raw per worker).

    python bench/loader.py                      # synthetic 256-px H&E-like stores in a temp dir
    python bench/loader.py --stores a.lmdb b.lmdb --magnifications 10 20   # your own stores
    python bench/loader.py --quick              # 4 bags of 32 patches, 64-px stores of 128, best of 1: a smoke test
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as e2epath's steps do, before torch loads
import cv2  # noqa: E402
import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from e2epath.data.bags import Bag, MultiScaleBagDataset, collate_bags
from e2epath.preprocess.store import (
    LmdbReader,
    LmdbWriter,
    close_all,
    encode_jpeg,
    patch_key,
)
from e2epath.train.recipe import E2E_RECIPE, GENERIC


def synthetic_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pink stroma with purple nuclei: compresses like tissue, unlike flat colour or pure noise."""
    img = np.full((size, size, 3), (234, 158, 196), np.uint8)
    for x, y, r in zip(rng.integers(0, size, 60), rng.integers(0, size, 60), rng.integers(3, 8, 60)):
        cv2.circle(img, (int(x), int(y)), int(r), (92, 58, 148), -1)
    noise = rng.normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_stores(folder: Path, n_stores: int, n_patches: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_stores):
        path = folder / f"S{s}.lmdb"
        with LmdbWriter(path, capacity_bytes=n_patches * size * size) as writer:
            for i in range(n_patches):
                writer.add(encode_jpeg(synthetic_patch(rng, size), 90), (i, 0), 1.0)
            writer.close({"slide_id": f"S{s}", "magnification": 10, "patch_size": size, "status": "ok"})
        paths.append(path)
    return paths


def make_dataset(stores: list[Path], mags: list[int], n_bags: int, n_instances: int, size: int) -> MultiScaleBagDataset:
    """``n_bags`` bags, each holding every store at every magnification (round robin)."""
    bags = []
    for b in range(n_bags):
        readers = {m: [LmdbReader(stores[(b + j) % len(stores)])] for j, m in enumerate(mags)}
        bags.append(Bag(f"B{b}", f"B{b}", [f"S{b}"], readers))
    targets = [torch.tensor(0)] * n_bags
    augment = {**GENERIC["augment"], **E2E_RECIPE["classification"]["augment"]}  # the sub-typing recipe's
    return MultiScaleBagDataset(bags, targets, n_instances, mags, [1 / len(mags)] * len(mags), size, 0, augment)


def sampled_keys(ds: MultiScaleBagDataset, items: list[int]) -> list[tuple[str, bytes]]:
    keys = []
    for pos in items:
        bag = ds.bags[ds.order[pos]]
        keys += [(str(bag.stores[m][s].path), patch_key(i)) for m, s, i in ds.sample(pos)]
    return keys


def raw_loop(keys: list[tuple[str, bytes]]) -> int:
    """The floor: one read transaction per store, get + imdecode every key."""
    close_all()  # py-lmdb opens a file once per process; the dataset's readers reopen lazily
    envs, txns = {}, {}
    for path, _ in keys:
        if path not in envs:
            envs[path] = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False)
            txns[path] = envs[path].begin(buffers=True)
    n = 0
    for path, key in keys:
        img = cv2.imdecode(np.frombuffer(txns[path].get(key), np.uint8), cv2.IMREAD_COLOR)
        n += img is not None
    for path, env in envs.items():
        txns[path].abort()
        env.close()
    return n


def raw_into_bags(keys: list[tuple[str, bytes]], bag_size: int) -> int:
    """The floor plus what any loader must do: decode into a freshly allocated bag array.

    Separates the cost of fresh memory (page faults, notably slow in some sandboxes / VMs) from
    the dataset's own overhead."""
    close_all()
    envs, txns = {}, {}
    n, bag = 0, None
    for k, (path, key) in enumerate(keys):
        if path not in envs:
            envs[path] = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False)
            txns[path] = envs[path].begin(buffers=True)
        img = cv2.imdecode(np.frombuffer(txns[path].get(key), np.uint8), cv2.IMREAD_COLOR)
        if k % bag_size == 0:
            bag = np.empty((bag_size, *img.shape), np.uint8)
        bag[k % bag_size] = img
        n += 1
    for path, env in envs.items():
        txns[path].abort()
        env.close()
    return n


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def dataset_loop(ds: MultiScaleBagDataset, workers: int) -> int:
    loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_bags,
                        prefetch_factor=4 if workers else None)
    return sum(x.shape[1] for x, *_ in loader)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", nargs="*", type=Path, help="existing LMDB stores (default: synthetic)")
    ap.add_argument("--magnifications", nargs="+", type=int, default=[10, 20])
    ap.add_argument("--patch-size", type=int, default=256, help="synthetic patch size")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--n-instances", type=int, default=512)
    ap.add_argument("--bags", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="best of")
    ap.add_argument("--quick", action="store_true",
                    help="4 bags of 32 patches of 56 px from synthetic 64-px stores of 128 patches, best of 1")
    args = ap.parse_args(argv)
    store_patches = 1024
    if args.quick:
        args.patch_size, args.input_size, args.n_instances, args.bags, args.repeats = 64, 56, 32, 4, 1
        store_patches = 128
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        stores = args.stores or write_stores(Path(tmp), 4, store_patches, args.patch_size)
        ds = make_dataset(stores, args.magnifications, args.bags, args.n_instances, args.input_size)
        half = len(ds) // 2
        keys = sampled_keys(ds, list(range(len(ds))))
        halves = [sampled_keys(ds, list(range(half))), sampled_keys(ds, list(range(half, len(ds))))]
        raw_loop(keys)  # warm the page cache for both
        best = {name: min(timed(fn, *a)[0] for _ in range(args.repeats)) for name, fn, a in (
            ("raw, 1 process", raw_loop, (keys,)),
            ("raw into fresh bag arrays", raw_into_bags, (keys, ds.bag_size)),
            ("dataset, 0 workers", dataset_loop, (ds, 0)),
            ("dataset, 2 workers", dataset_loop, (ds, 2)),
        )}
        with mp.get_context("fork").Pool(2) as pool:  # the raw floor with 2 processes
            best["raw, 2 processes"] = min(timed(lambda: sum(pool.map(raw_loop, halves)))[0]
                                           for _ in range(args.repeats))
    n = len(keys)
    rate = {k: n / v for k, v in best.items()}
    print(f"{len(ds)} bags x {ds.bag_size} patches ({n} patches), input {args.input_size} px, "
          f"{'synthetic ' + str(args.patch_size) + '-px' if not args.stores else 'given'} stores\n")
    print("| loader | patches/s | ratio vs raw |")
    print("|---|---:|---:|")
    for name, base in (("raw, 1 process", "raw, 1 process"), ("raw into fresh bag arrays", "raw, 1 process"),
                       ("dataset, 0 workers", "raw, 1 process"),
                       ("raw, 2 processes", "raw, 2 processes"), ("dataset, 2 workers", "raw, 2 processes")):
        print(f"| {name} | {rate[name]:,.0f} | {rate[name] / rate[base]:.2f}x |")
    print(f"\nper worker: dataset / raw = {rate['dataset, 0 workers'] / rate['raw, 1 process']:.2f} (goal >= 0.85); "
          f"dataset / raw into fresh bag arrays = "
          f"{rate['dataset, 0 workers'] / rate['raw into fresh bag arrays']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
