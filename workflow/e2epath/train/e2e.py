"""End-to-end training: encoder + aggregator trained jointly on multi-scale random samples.

What is E2E-specific lives here: the joint model, the sampled-bag loader, and prediction of a
full bag (every patch of the evaluation magnification through the encoder in chunks under
no_grad). The loop, the tasks and the outputs are shared with two-stage training.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import (
    Bag,
    MultiScaleBagDataset,
    balanced_order,
    collate_bags,
    full_boxes,
    iter_full_bag,
    load_bags,
    resized_crops,
)
from ..models import build_aggregator
from .fold import (
    bag_outputs,
    encoder_from_spec,
    finish_checkpoint,
    keep_cases,
    load_fold,
    make_task,
    parser,
    prepare_checkpoint,
)
from .loop import device, fit, write_outputs

logger = logging.getLogger(__name__)


class E2EModel(nn.Module):
    """Encoder applied to every instance, then the MIL aggregator over each bag."""

    def __init__(self, encoder: nn.Module, aggregator: nn.Module) -> None:
        super().__init__()
        self.encoder, self.aggregator = encoder, aggregator

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalised [n, 3, H, W] → [n, D]; channels_last feeds cuDNN's fast NHWC kernels on GPU."""
        layout = torch.channels_last if patches.is_cuda else torch.contiguous_format
        return self.encoder(patches.contiguous(memory_format=layout))

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        """bags: [B, S, 3, H, W] normalised → logits [B, outputs]."""
        b, s = bags.shape[:2]
        feats = self.encode(bags.flatten(0, 1)).view(b, s, -1)
        return self.aggregator(feats)


def epoch_order(strata: np.ndarray, spec: dict, seed: int, epoch: int) -> np.ndarray:
    """The epoch's bag order, seeded by (seed, epoch); minority classes oversampled (not survival)."""
    oversample = spec["oversample"] and spec["task_type"] != "survival"
    return balanced_order(strata, np.random.default_rng([seed, epoch]), oversample)


def sampled_batches(dataset: MultiScaleBagDataset, strata: np.ndarray, spec: dict, seed: int, dev):
    """epoch → iterator of (augmented, normalised bags [B, S, 3, size, size] on ``dev``, targets).

    Workers decode; cropping, flipping, resizing and normalising run batched on ``dev``.
    """
    size = spec["input_size"]

    def batches(epoch: int):
        dataset.set_epoch(epoch, epoch_order(strata, spec, seed, epoch))
        loader = DataLoader(dataset, batch_size=spec["batch_size"], shuffle=False, collate_fn=collate_bags,
                            num_workers=spec["workers"], pin_memory=dev.type == "cuda",
                            prefetch_factor=2 if spec["workers"] else None)
        for patches, boxes, target, _ in loader:
            b, s = patches.shape[:2]
            x = resized_crops(patches.to(dev, non_blocking=True).flatten(0, 1), boxes.flatten(0, 1), size)
            yield x.view(b, s, *x.shape[1:]), target
    return batches


def full_bag_predictor(model: E2EModel, task, bags: dict[str, Bag], spec: dict, dev):
    """case ids → (predictions, attention per slide), all patches of the eval magnification."""
    mag, size, chunk = spec["eval_magnification"], spec["input_size"], spec["eval_chunk"]

    def inputs(x: torch.Tensor) -> torch.Tensor:
        return resized_crops(x.to(dev), full_boxes(len(x), *x.shape[1:3]), size)

    @torch.no_grad()
    def predict(case_ids: list[str]):
        model.eval()
        logits, attention = [], []
        for case in case_ids:
            feats, parts = [], []
            for slide, coords, x in iter_full_bag(bags[case], mag, chunk):
                with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                    feats.append(model.encode(inputs(x)).float())
                parts.append((slide, coords))
            if not feats:
                raise RuntimeError(f"case {case}: no patches at {mag}x for evaluation")
            out, attn = model.aggregator(torch.cat(feats)[None], return_attention=True)
            logits.append(out.float())
            attention.append((attn[0], _merge(parts)))
        return bag_outputs(task, case_ids, logits, attention)
    return predict


def _merge(parts):
    """Chunks of one slide → one (slide, coords) entry, keeping slide order."""
    merged: dict[str, list] = {}
    for slide, coords in parts:
        merged.setdefault(slide, []).append(coords)
    return [(s, np.concatenate(c)) for s, c in merged.items()]


def cli(argv: list[str] | None = None) -> int:
    ap = parser("e2epath train_e2e")
    ap.add_argument("--rows", nargs="+", required=True, help="manifest rows results/patches/{mag}x/{slide}.json")
    args = ap.parse_args(argv)
    fold = load_fold(args)
    spec, dev = fold.spec, device()
    all_cases = [c for ids in fold.cases.values() for c in ids]
    bags = load_bags(args.slides, args.rows, all_cases)
    eval_mag = spec["eval_magnification"]
    sampling = spec["sampling"]
    # evaluation needs the eval magnification; training also needs one of the sampling ones
    usable = {c for c, b in bags.items() if b.n_patches(eval_mag) > 0}
    keep_cases(fold, usable, train_only={c for c in usable
                                         if any(bags[c].n_patches(m) for m in sampling["magnifications"])})
    task = make_task(fold)
    encoder = encoder_from_spec(spec["encoder"], spec["weights"], args.seed)
    aggregator = build_aggregator(spec["aggregator"], encoder.out_dim, task.n_outputs, **spec["aggregator_kw"])
    model = E2EModel(encoder, aggregator).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed bag shape: pick the fastest kernels once
    train = fold.cases["train"]
    seed = args.seed * 1000 + args.fold
    dataset = MultiScaleBagDataset([bags[c] for c in train], [task.target(c) for c in train],
                                   spec["n_instances"], sampling["magnifications"], sampling["ratios"],
                                   spec["input_size"], seed)
    logger.info("training bags: %d patches each (%s), %d px; evaluation: every patch at %dx",
                dataset.bag_size, dict(zip(dataset.mags, dataset.counts)), spec["input_size"], eval_mag)
    if spec["batch_size"] == 1 and spec["weights"] in (None, "auto"):
        logger.warning("batch_size 1: BatchNorm normalises each step by one case's patches, evaluation by "
                       "running statistics; from random init this mismatch can invert predictions (seen on "
                       "the demo). Prefer batch_size >= 2 or ImageNet weights")
    batches = sampled_batches(dataset, task.strata(train), spec, seed, dev)
    predict = full_bag_predictor(model, task, bags, spec, dev)
    prepare_checkpoint(fold.checkpoint, spec)
    per_step = dataset.bag_size * spec["batch_size"]
    result = fit(model, task, batches, predict, fold.cases["val"], spec, fold.checkpoint, per_step)
    write_outputs(result, model, predict, fold.cases["test"], spec, fold.outputs,
                  extra={"classes": getattr(task, "classes", None)})
    finish_checkpoint(fold.checkpoint)
    return 0
