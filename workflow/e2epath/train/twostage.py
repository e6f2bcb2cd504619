"""Two-stage MIL: an aggregator trained on frozen features of full bags (batch size 1).

Same job skeleton, splits, loop, tasks, model selection and outputs as E2E (`job`); only the
inputs (feature files, `e2epath.features.files`) and the model differ.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from e2epath.features.files import load_feature_bags
from e2epath.models.aggregators import build_aggregator
from e2epath.train import job as training

logger = logging.getLogger(__name__)


class TwoStage(training.Family):
    """Full bags of frozen-encoder features; only the aggregator is trained (batch size 1)."""

    def __init__(self, job: training.TrainingJob, inputs: list[Path], cases: list[str]) -> None:
        super().__init__(job, inputs, cases)
        # inputs: feature files / shard tables
        self.bags, encoders = load_feature_bags(job.slides, inputs, set(cases), self.spec["bag"])
        if len(encoders) > 1:
            raise ValueError(f"the feature files of {self.spec['encoder']} come from {len(encoders)} different "
                             f"checkpoints ({', '.join(str(e.get('path')) for e in encoders.values())}); rerun "
                             "its extract_features jobs")
        self.encoder = next(iter(encoders.values()), {"name": self.spec["encoder"], "weights": None})
        self.in_dim = next(iter(self.bags.values())).features.shape[1] if self.bags else 0

    @property
    def trainable(self) -> set[str]:
        return set(self.bags)

    def model(self, task, dev):
        spec = self.spec
        return build_aggregator(spec["aggregator"], self.in_dim, task.n_outputs, **spec["aggregator_kw"]).to(dev)

    def training_data(self, task, train, dev):
        bags = self.bags

        def draw(epoch: int, order: np.ndarray):
            for i in order:
                bag = bags[train[i]]
                yield bag.features[None].to(dev), task.target(bag.case_id)[None]
        return training.TrainingData(draw, float(np.mean([len(bags[u]) for u in train])))

    def model_record(self, task):
        return {**super().model_record(task), "in_dim": self.in_dim}

    @property
    def encoder_record(self):
        return self.encoder


def cli(argv: list[str] | None = None) -> int:
    return training.main(argv, "e2epath train_twostage", TwoStage,
                         "the slides' feature files (results/features/{encoder}/{mag}x/{slide}.pt), or their "
                         "shard tables")
