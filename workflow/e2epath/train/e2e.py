"""End-to-end training: encoder + aggregator trained jointly on multi-scale random samples.

What is E2E-specific lives here: the joint model, the sampled-bag loader, and prediction of a
full bag (every patch of the evaluation magnification through the encoder in chunks under
no_grad). The job skeleton, the loop, the tasks and the outputs are shared with two-stage
training (`job`, `loop`, `tasks`).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from e2epath.core import seeds
from e2epath.data.bags import (
    Bag,
    MultiScaleBagDataset,
    collate_bags,
    iter_full_bag,
    load_bags,
)
from e2epath.data.stats import IMAGENET_MEAN, IMAGENET_STD
from e2epath.data.transforms import model_inputs, resized_crops
from e2epath.models import build_aggregator, build_encoder
from e2epath.models.weights import weights_record
from e2epath.train import job as training
from e2epath.train.tasks import Task

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

    def forward(self, bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """bags: [B, S, 3, H, W] normalised → logits [B, outputs]. ``mask`` [B, S] (True = a real
        patch) marks bags shorter than S: only real patches go through the encoder (BatchNorm never
        sees padding) and the aggregator ignores the rest."""
        b, s = bags.shape[:2]
        if mask is None:
            return self.aggregator(self.encode(bags.flatten(0, 1)).view(b, s, -1))
        real = self.encode(bags[mask])
        feats = real.new_zeros((b, s, real.shape[-1]))
        feats[mask] = real
        return self.aggregator(feats, mask=mask)


def stats(spec: dict) -> tuple:
    """The encoder's normalisation (mean, std), ImageNet's for a spec without a preset."""
    enc = spec.get("encoder_spec") or {}
    return tuple(enc.get("mean", IMAGENET_MEAN)), tuple(enc.get("std", IMAGENET_STD))


def sampled_batches(dataset: MultiScaleBagDataset, spec: dict, dev: torch.device):
    """(epoch, bag order) → iterator of ((augmented, normalised bags [B, S, 3, size, size] on
    ``dev``, mask [B, S] or None), targets). Workers decode; cropping, flipping, shifting,
    resizing and normalising run batched on ``dev``."""
    size, (mean, std) = spec["input_size"], stats(spec)
    fill = "black" if spec["augment"]["translate"] > 0 else "border"

    def batches(epoch: int, order: np.ndarray):
        dataset.set_epoch(epoch, order)
        loader = DataLoader(dataset, batch_size=spec["batch_size"], shuffle=False, collate_fn=collate_bags,
                            num_workers=spec["workers"], pin_memory=dev.type == "cuda",
                            prefetch_factor=2 if spec["workers"] else None)
        for patches, boxes, target, _, mask in loader:
            b, s = patches.shape[:2]
            x = resized_crops(patches.to(dev, non_blocking=True).flatten(0, 1), boxes.flatten(0, 1), size, fill,
                              mean, std)
            yield (x.view(b, s, *x.shape[1:]), None if mask is None else mask.to(dev)), target
    return batches


def decode_threads_for(dev: torch.device) -> int:
    """Threads that decode the next chunks while the encoder runs: 2 beside a GPU; on CPU only the
    cores torch leaves free (decoding threads next to torch's own on the same cores slow both:
    bench/inference.py)."""
    if dev.type == "cuda":
        return 2
    return max(0, min(2, len(os.sched_getaffinity(0)) - torch.get_num_threads()))


@torch.no_grad()
def predict_bag(model: E2EModel, bag: Bag, spec: dict, dev: torch.device, decode_threads: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, np.ndarray]]]:
    """One full bag through the model: every patch of the eval magnification, its centre crop
    (or whole: ``eval_crop``) at the input size, encoded in chunks of ``eval_chunk``; the
    aggregator over all of them; the next chunks are decoded in ``decode_threads`` threads
    (default: `decode_threads_for`) while the encoder runs (the same patches in the same order
    whatever the count). (logits [1, outputs], attention [heads, N], [(slide, coords)]).
    Test predictions and `python -m e2epath predict` both go through here."""
    mag, size, chunk, crop = spec["eval_magnification"], spec["input_size"], spec["eval_chunk"], spec["eval_crop"]
    mean, std = stats(spec)
    model.eval()
    feats, parts = [], []
    threads = decode_threads_for(dev) if decode_threads is None else decode_threads
    for slide, coords, x in iter_full_bag(bag, mag, chunk, threads):
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            feats.append(model.encode(model_inputs(x.to(dev), size, crop, mean, std)).float())
        parts.append((slide, coords))
    if not feats:
        raise RuntimeError(f"{spec['bag']} {bag.unit_id}: no patches at {mag}x for evaluation")
    out, attn = model.aggregator(torch.cat(feats)[None], return_attention=True)
    return out.float(), attn[0], _merge(parts)


def full_bag_predictor(task: Task, bags: dict[str, Bag], spec: dict, dev: torch.device):
    """(model, bag ids) → (predictions, attention per slide) of full bags (`predict_bag`)."""
    units = {u: b.case_id for u, b in bags.items()}

    @torch.no_grad()
    def predict(model: E2EModel, unit_ids: list[str]):
        logits, attention = [], []
        for unit in unit_ids:
            out, attn, parts = predict_bag(model, bags[unit], spec, dev)
            logits.append(out)
            attention.append((attn, parts))
        return training.bag_outputs(task, unit_ids, units, spec["bag"], logits, attention)
    return predict


def _merge(parts):
    """Chunks of one slide → one (slide, coords) entry, keeping slide order."""
    merged: dict[str, list] = {}
    for slide, coords in parts:
        merged.setdefault(slide, []).append(coords)
    return [(s, np.concatenate(c)) for s, c in merged.items()]


class EndToEnd(training.Family):
    """Bags of patches from the LMDB stores; the encoder is trained with the aggregator."""

    def load(self, cases):
        # inputs: manifest rows / patch tables
        self.bags = load_bags(self.job.slides, self.inputs, cases, self.spec["bag"])
        eval_mag, mags = self.spec["eval_magnification"], self.spec["sampling"]["magnifications"]
        # evaluation needs the eval magnification; training also needs one of the sampling ones
        usable = {u: b.case_id for u, b in self.bags.items() if b.n_patches(eval_mag) > 0}
        return usable, {u for u in usable if any(self.bags[u].n_patches(m) for m in mags)}

    def build(self, task, dev):
        spec = self.spec
        enc = spec.get("encoder_spec") or spec["encoder"]  # the preset as the config changes it
        encoder = build_encoder(enc, spec["weights"], seed=seeds.encoder(self.job.seed))  # the same in every fold
        encoder.set_trainable_blocks(spec.get("trainable_blocks"))
        if spec.get("grad_checkpointing"):
            encoder.set_grad_checkpointing(True)
            logger.info("encoder %s: gradient checkpointing on (activations recomputed in the backward pass)",
                        spec["encoder"])
        aggregator = build_aggregator(spec["aggregator"], encoder.out_dim, task.n_outputs, **spec["aggregator_kw"])
        model = E2EModel(encoder, aggregator).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # fixed bag shape: pick the fastest kernels once
        return model

    def batches(self, task, train, dev):
        spec, sampling = self.spec, self.spec["sampling"]
        self.dataset = MultiScaleBagDataset([self.bags[u] for u in train],
                                            [task.target(self.bags[u].case_id) for u in train],
                                            spec["n_instances"], sampling["magnifications"], sampling["ratios"],
                                            spec["input_size"], self.job.fold_seed, spec["augment"])
        logger.info("training bags (%s): %d patches each (%s), %d px, augmentation %s; evaluation: every patch "
                    "at %dx (%s)", spec["bag"], self.dataset.bag_size,
                    dict(zip(self.dataset.mags, self.dataset.counts)), spec["input_size"], spec["augment"],
                    spec["eval_magnification"], spec["eval_crop"])
        if spec["weights"] is None:
            logger.warning("weights: null — the encoder trains from random initialisation")
        if spec["batch_size"] == 1 and spec["weights"] is None:
            logger.warning("batch_size 1: BatchNorm normalises each step by one case's patches, evaluation by "
                           "running statistics; from random init this mismatch can invert predictions (seen on "
                           "the demo). Prefer batch_size >= 2 or ImageNet weights")
        return sampled_batches(self.dataset, spec, dev)

    def predictor(self, task, dev):
        return full_bag_predictor(task, self.bags, self.spec, dev)

    @property
    def patches_per_bag(self) -> float:
        return self.dataset.bag_size

    def model_extras(self, task):
        weights = weights_record(self.spec["weights"], list(self.job.pretrained))
        return {**super().model_extras(task), "encoder_weights": weights,
                "encoder": {"name": self.spec["encoder"], **weights}}


def cli(argv: list[str] | None = None) -> int:
    return training.main(argv, "e2epath train_e2e", EndToEnd, "rows",
                         "the slides' manifest rows (results/patches/{mag}x/{slide}.json), or their shard tables")
