"""Feature extraction throughput vs the encoder forward alone (data-pipeline overhead).

    .venv/bin/python bench/features.py                       # ResNet-50, 128-px patches → 64-px input
    .venv/bin/python bench/features.py --patch-size 64 --n 256

One process, CPU, torch.set_num_threads(2). A real LMDB store of ``--n`` JPEG patches (smooth
random textures, quality 90) is written to a temporary folder. Measured, interleaved over
``--rounds`` rounds (median reported):

- forward: the frozen encoder on pre-decoded, pre-resized, pre-normalised tensors (made once by
  `transforms.model_inputs`, as the pipeline makes them), same batch size;
- extract, workers=0: `features.extract` decoding each batch inline;
- extract, workers=W: `features.extract` decoding the next batches in W background threads.

overhead = extract time / forward time − 1 (goal ≤ 15 %). The input size is small (64 px by
default, the demo config's) because 224 px is too slow on 2 shared cores; decoding costs scale
with the stored patch size, the forward with the input size, so 128 → 64 px is a harsher ratio
than the paper's 256 → 224. On a shared machine treat the numbers as rough.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from e2epath import features  # noqa: E402
from e2epath.store import LmdbReader, LmdbWriter, encode_jpeg  # noqa: E402
from e2epath.transforms import model_inputs  # noqa: E402

GOAL = 0.15


def write_store(path: Path, n: int, patch: int, seed: int = 0) -> LmdbReader:
    rng = np.random.default_rng(seed)
    with LmdbWriter(path, capacity_bytes=n * patch * patch) as w:
        for i in range(n):
            rgb = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (patch, patch),
                             interpolation=cv2.INTER_CUBIC)
            w.add(encode_jpeg(rgb, 90), (i * patch, 0), 1.0)
        w.close({"slide_id": "bench", "magnification": 20, "patch_size": patch, "status": "ok", "message": ""})
    return LmdbReader(path)


@torch.no_grad()
def forward_only(encoder, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    for x in batches:
        encoder(x).half()
    return time.perf_counter() - t


def timed_extract(encoder, store, input_size: int, batch_size: int, workers: int) -> float:
    t = time.perf_counter()
    features.extract(encoder, store, input_size, batch_size, torch.device("cpu"), workers)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="resnet50")
    ap.add_argument("--n", type=int, default=256, help="patches in the store")
    ap.add_argument("--patch-size", type=int, default=128, help="stored patch px")
    ap.add_argument("--input-size", type=int, default=64, help="encoder input px")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    encoder = features.build_frozen_encoder(a.encoder, None, 0, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "bench.lmdb", a.n, a.patch_size)
        decoded = [model_inputs(torch.from_numpy(np.stack([store.get_rgb(i) for i in
                                                           range(s, min(s + a.batch_size, a.n))])), a.input_size,
                                "whole") for s in range(0, a.n, a.batch_size)]
        runs = {"forward (pre-decoded)": lambda: forward_only(encoder, decoded)}
        for w in sorted({0, a.workers}):
            runs[f"extract, workers={w}"] = lambda w=w: timed_extract(encoder, store, a.input_size, a.batch_size, w)
        forward_only(encoder, decoded[:1])  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():
                times[name].append(fn())
    base = statistics.median(times["forward (pre-decoded)"])
    print(f"\n{a.encoder}, {a.n} patches of {a.patch_size} px → {a.input_size} px input, batch {a.batch_size}, "
          f"CPU, 2 torch threads, median of {a.rounds}\n")
    print("| run | seconds | features/s | overhead vs forward |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {a.n / t:.0f} | {t / base - 1:+.1%} |")
    best = min(statistics.median(ts) for name, ts in times.items() if name.startswith("extract"))
    print(f"\nbest extraction overhead {best / base - 1:+.1%} (goal ≤ {GOAL:.0%})")


if __name__ == "__main__":
    main()
