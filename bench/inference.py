"""Whole-slide inference time vs the encoder forward alone (paper Table 4, "IT").

    .venv/bin/python bench/inference.py                  # 10^4 patches, ResNet-18 + ABMILX, 128 → 112 px (CPU)
    .venv/bin/python bench/inference.py --patch-size 256 --input-size 224   # the paper's setting (GPU)
    .venv/bin/python bench/inference.py --quick          # 300 patches, 64 → 56 px, chunks of 128, 1 round: smoke test

One process, torch.set_num_threads(2) on CPU. A real LMDB store of ``--n`` JPEG patches (128 px,
smooth random textures, quality 90) is written to a temporary folder; a slide's bag of them goes
through the path `python -m e2epath predict` and the test predictions take
(`train.inference.predict_bag`: JPEG decoding in background threads where cores are free — none beside
torch's 2 threads on a 2-core machine —, crop or resize + normalise on the device,
the encoder in chunks of ``--chunk``, ABMILX over all N instances). Measured, interleaved over
``--rounds`` rounds (median reported):

- forward: the encoder alone on pre-decoded, pre-resized, pre-normalised tensors, same chunks;
- slide: `predict_bag` on the store, everything included (decoding, aggregation).

overhead = slide time / forward time − 1 (goal ≤ 10 % on CPU). On CUDA the encoder runs under
autocast and channels_last, as in the workflow. Evaluation is the recipe's (the centre crop at the
input size: 224 of 256 px) at half resolution on CPU — 112 of 128 px — because 10^4 patches at
224 px take minutes per run on 2 cores. `--crop whole --input-size 64` shows the harshest case:
a resize to a tiny input, where JPEG decoding, resizing and ABMILX (fixed costs per patch) weigh
most against the encoder.
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
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from e2epath.core.devices import torch_device  # noqa: E402
from e2epath.data.bags import Bag  # noqa: E402
from e2epath.data.decoding import decode_threads_for  # noqa: E402
from e2epath.data.transforms import model_inputs  # noqa: E402
from e2epath.models.aggregators import build_aggregator
from e2epath.models.e2e import E2EModel  # noqa: E402
from e2epath.models.encoders import make_encoder  # noqa: E402
from e2epath.models.presets import encoder_spec  # noqa: E402
from e2epath.train.inference import predict_bag  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from features import print_ratios, write_store  # noqa: E402

GOAL = 0.10


@torch.no_grad()
def forward_only(model: E2EModel, chunks: list[torch.Tensor], dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in chunks:
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            model.encode(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def whole_slide(model: E2EModel, bag: Bag, spec: dict, dev: torch.device, threads: int) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    predict_bag(model, bag, spec, dev, threads)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--n", type=int, default=10_000, help="patches in the slide")
    ap.add_argument("--patch-size", type=int, default=128, help="stored patch px")
    ap.add_argument("--input-size", type=int, default=112, help="encoder input px")
    ap.add_argument("--crop", default="center", choices=["center", "whole"], help="evaluation input (eval_crop)")
    ap.add_argument("--chunk", type=int, default=256, help="patches per encoder call")
    ap.add_argument("--threads", type=int, default=None, help="decoding threads (default: predict_bag's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="300 patches of 64 → 56 px, chunks of 128, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.n, a.patch_size, a.input_size, a.chunk, a.rounds = 300, 64, 56, 128, 1
    dev = torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(2)
    if a.threads is None:
        a.threads = decode_threads_for(dev)
    enc_spec = encoder_spec(a.encoder, {"input_size": a.input_size})
    torch.manual_seed(0)
    encoder = make_encoder(enc_spec)
    model = E2EModel(encoder, build_aggregator("abmilx", encoder.out_dim, 2)).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    spec = {"eval_magnification": 20, "input_size": a.input_size, "eval_chunk": a.chunk, "eval_crop": a.crop,
            "bag": "slide", "encoder_spec": enc_spec}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "slide.lmdb", a.n, a.patch_size)
        bag = Bag("bench", "bench", ["bench"], {20: [store]})
        rgb = [np.stack([store.get_rgb(i) for i in range(s, min(s + a.chunk, a.n))]) for s in range(0, a.n, a.chunk)]
        chunks = [model_inputs(torch.from_numpy(x).to(dev), a.input_size, a.crop) for x in rgb]
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format  # as E2EModel.encode
        chunks = [c.contiguous(memory_format=layout) for c in chunks]
        forward_only(model, chunks[:1], dev)  # warm-up
        times: dict[str, list[float]] = {"encoder forward (pre-decoded)": [], "whole slide (predict_bag)": []}
        for _ in range(a.rounds):
            times["encoder forward (pre-decoded)"].append(forward_only(model, chunks, dev))
            times["whole slide (predict_bag)"].append(whole_slide(model, bag, spec, dev, a.threads))
    base = statistics.median(times["encoder forward (pre-decoded)"])
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU, 2 torch threads"
    print(f"\n{a.encoder} + ABMILX, one slide of {a.n} patches of {a.patch_size} px → {a.input_size} px input "
          f"({a.crop}), "
          f"chunks of {a.chunk}, {a.threads} decoding threads, {where}, median of {a.rounds}\n")
    print_ratios(times, a.n, base, "patches/s")
    slide = statistics.median(times["whole slide (predict_bag)"])
    print(f"\nwhole-slide inference overhead {slide / base - 1:+.1%} (goal ≤ {GOAL:.0%})")


if __name__ == "__main__":
    main()
