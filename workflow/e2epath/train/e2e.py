"""End-to-end training: encoder + aggregator trained jointly on multi-scale random samples.

What is E2E-specific lives here: the bags of patches, the model (`e2epath.models.e2e.E2EModel`) and
the sampled-bag loader whose augmentation runs batched on the training device. The job skeleton,
the loop, the tasks, full-bag prediction and the outputs are shared with two-stage training (`job`,
`loop`, `tasks`, `inference`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from e2epath.core import seeds
from e2epath.data.bags import (
    MultiScaleBagDataset,
    collate_bags,
    load_bags,
)
from e2epath.data.transforms import resized_crops
from e2epath.models.aggregators import build_aggregator
from e2epath.models.e2e import E2EModel
from e2epath.models.weights import build_encoder, weights_record
from e2epath.train import job as training
from e2epath.train.inference import stats

logger = logging.getLogger(__name__)


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


class EndToEnd(training.Family):
    """Bags of patches from the LMDB stores; the encoder is trained with the aggregator."""

    def __init__(self, job: training.TrainingJob, inputs: list[Path], cases: list[str]) -> None:
        super().__init__(job, inputs, cases)
        spec = self.spec
        # inputs: manifest rows / patch tables; evaluation needs the eval magnification
        bags = load_bags(job.slides, inputs, cases, spec["bag"])
        self.bags = {u: b for u, b in bags.items() if b.n_patches(spec["eval_magnification"]) > 0}
        self.weights = weights_record(spec["weights"], list(job.pretrained))

    @property
    def trainable(self) -> set[str]:
        mags = self.spec["sampling"]["magnifications"]  # training also needs one of the sampling ones
        return {u for u, b in self.bags.items() if any(b.n_patches(m) for m in mags)}

    def model(self, task, dev):
        spec = self.spec
        encoder = build_encoder(spec["encoder_spec"], spec["weights"], seed=seeds.encoder(self.job.seed))
        encoder.set_trainable_blocks(spec["trainable_blocks"])
        if spec["grad_checkpointing"]:
            encoder.set_grad_checkpointing(True)
            logger.info("encoder %s: gradient checkpointing on (activations recomputed in the backward pass)",
                        spec["encoder"])
        aggregator = build_aggregator(spec["aggregator"], encoder.out_dim, task.n_outputs, **spec["aggregator_kw"])
        model = E2EModel(encoder, aggregator).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # fixed bag shape: pick the fastest kernels once
        return model

    def training_data(self, task, train, dev):
        spec, sampling = self.spec, self.spec["sampling"]
        dataset = MultiScaleBagDataset([self.bags[u] for u in train], [task.target(self.bags[u].case_id) for u in train],
                                       spec["n_instances"], sampling["magnifications"], sampling["ratios"],
                                       spec["input_size"], self.job.fold_seed, spec["augment"])
        logger.info("training bags (%s): %d patches each (%s), %d px, augmentation %s; evaluation: every patch "
                    "at %dx (%s)", spec["bag"], dataset.bag_size, dict(zip(dataset.mags, dataset.counts)),
                    spec["input_size"], spec["augment"], spec["eval_magnification"], spec["eval_crop"])
        if spec["weights"] is None:
            logger.warning("weights: null — the encoder trains from random initialisation")
        if spec["batch_size"] == 1 and spec["weights"] is None:
            logger.warning("batch_size 1: BatchNorm normalises each step by one case's patches, evaluation by "
                           "running statistics; from random init this mismatch can invert predictions (seen on "
                           "the demo). Prefer batch_size >= 2 or ImageNet weights")
        return training.TrainingData(sampled_batches(dataset, spec, dev), dataset.bag_size)

    def model_record(self, task):
        return {**super().model_record(task), "encoder_weights": self.weights}

    @property
    def encoder_record(self):
        return {"name": self.spec["encoder"], **self.weights}


def cli(argv: list[str] | None = None) -> int:
    return training.main(argv, "e2epath train_e2e", EndToEnd,
                         "the slides' manifest rows (results/patches/{mag}x/{slide}.json), or their shard tables")
