"""E2E training-step throughput: ResNet trunk + ABMILX on one bag of sampled patches per step.

Runs the production step (`train.loop.train_epoch` on `models.e2e.E2EModel`, device-side
RandomResizedCrop + flips + normalisation from `transforms.resized_crops`, AMP + channels_last on CUDA)
on synthetic uint8 bags, so it needs no results/ and no data. Prints train patches/s per encoder
and, on CUDA, the ratio to the same step in fp32 without AMP (the baseline,
measured in the same run). Goal on one H200: ≥ 5,300 train patches/s for ResNet-18.

    python bench/gpu_e2e.py                 # 512 patches per bag at 224 px (stored 256 px)
    python bench/gpu_e2e.py --quick         # 2 steps on 16 patches of 32 px (stored 40): a CPU smoke test
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from e2epath.data.transforms import resized_crops
from e2epath.models.aggregators import build_aggregator
from e2epath.models.e2e import E2EModel
from e2epath.models.weights import build_encoder
from e2epath.train.loop import build_optimizer, train_epoch
from e2epath.train.tasks import ClassificationTask


def synthetic_batches(n_steps: int, bag: int, stored: int, size: int, dev: torch.device):
    """What `train.e2e.sampled_batches` yields: (augmented bags [1, S, 3, size, size], no mask) + targets."""
    gen = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (bag, stored, stored, 3), dtype=torch.uint8, generator=gen)
    if dev.type == "cuda":
        patches = patches.pin_memory()
    area = torch.empty(bag).uniform_(0.5, 1.0, generator=gen)
    side = (area.sqrt() * stored).floor()
    boxes = torch.stack([torch.zeros(bag), torch.zeros(bag), side, side,
                         torch.rand(bag, generator=gen) < 0.5, torch.rand(bag, generator=gen) < 0.5], 1)
    for step in range(n_steps):
        x = resized_crops(patches.to(dev, non_blocking=True), boxes, size)
        yield (x[None], None), torch.tensor([step % 2])


def run(encoder_name: str, args, dev: torch.device, amp: bool) -> float:
    """Train patches/s of ``args.steps`` timed steps after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    encoder = build_encoder(encoder_name, None)
    model = E2EModel(encoder, build_aggregator("abmilx", encoder.out_dim, 2)).to(dev)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    task = ClassificationTask(pd.DataFrame({"case_id": ["a", "b"], "label": ["x", "y"]}))
    opt = build_optimizer(model.parameters(), {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0})
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def epoch(n_steps: int) -> None:
        batches = synthetic_batches(n_steps, args.bag, args.stored, args.size, dev)
        train_epoch(model, task, batches, opt, scaler, 1, dev, amp=amp)
        _sync(dev)

    epoch(args.warmup)  # cuDNN autotuning, allocator warm-up
    t0 = time.perf_counter()
    epoch(args.steps)
    return args.steps * args.bag / (time.perf_counter() - t0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 steps on 16 patches of 32 px (stored 40): CPU smoke test")
    ap.add_argument("--encoders", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--bag", type=int, default=512, help="patches per bag (one bag per step)")
    ap.add_argument("--size", type=int, default=224, help="input size after RandomResizedCrop")
    ap.add_argument("--stored", type=int, default=256, help="stored patch size")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 reference on CUDA")
    args = ap.parse_args(argv)
    logging.getLogger("e2epath").setLevel(logging.ERROR)  # "random init" warnings: known here
    if args.quick:
        args.bag, args.size, args.stored, args.steps, args.warmup = 16, 32, 40, 2, 1
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: one bag of {args.bag} patches per step, {args.size} px (stored {args.stored}), "
          f"{args.steps} timed steps after {args.warmup}\n")
    print("| encoder | precision | train patches/s | vs fp32 |")
    print("|---|---|---:|---:|")
    for enc in args.encoders:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fast = run(enc, args, dev, amp=True)
            peak = torch.cuda.max_memory_allocated() / 2**30
            base = None if args.no_baseline else run(enc, args, dev, amp=False)
            ratio = f"{fast / base:.2f}x" if base else "-"
            print(f"| {enc} + abmilx | AMP fp16, channels_last (peak {peak:.1f} GiB) | {fast:,.0f} | {ratio} |")
            if base:
                print(f"| {enc} + abmilx | fp32 (no AMP) | {base:,.0f} | 1.00x |")
        else:
            print(f"| {enc} + abmilx | fp32 (CPU) | {run(enc, args, dev, amp=False):,.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
