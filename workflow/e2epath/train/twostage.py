"""Two-stage MIL: an aggregator trained on frozen features of full bags (batch size 1).

Same job skeleton, splits, loop, tasks, model selection and outputs as E2E (`job`); only the
inputs and the model differ.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from e2epath.features.files import load_feature_bags
from e2epath.models import build_aggregator
from e2epath.train import job as training

logger = logging.getLogger(__name__)


class TwoStage(training.Family):
    """Full bags of frozen-encoder features; only the aggregator is trained (batch size 1)."""

    def load(self, cases):
        # inputs: feature files / shard tables
        encoders: dict = {}
        self.bags, self.units = load_feature_bags(self.job.slides, self.inputs, set(cases), self.spec["bag"],
                                                  encoders)
        if len(encoders) > 1:
            raise ValueError(f"the feature files of {self.spec['encoder']} come from {len(encoders)} different "
                             f"checkpoints ({', '.join(str(e.get('path')) for e in encoders.values())}); rerun "
                             "its extract_features jobs")
        self.encoder = next(iter(encoders.values()), {"name": self.spec["encoder"], "weights": None})
        return dict(self.units), set(self.bags)

    def build(self, task, dev):
        self.in_dim = next(iter(self.bags.values()))[0].shape[1]
        spec = self.spec
        return build_aggregator(spec["aggregator"], self.in_dim, task.n_outputs, **spec["aggregator_kw"]).to(dev)

    def batches(self, task, train, dev):
        self.mean_n = float(np.mean([len(self.bags[c][0]) for c in train]))

        def batches(epoch: int, order: np.ndarray):
            for i in order:
                bag = train[i]
                yield self.bags[bag][0][None].to(dev), task.target(self.units[bag])[None]
        return batches

    def predictor(self, task, dev):
        bags, units, unit = self.bags, self.units, self.spec["bag"]

        @torch.no_grad()
        def predict(model, unit_ids: list[str]):
            model.eval()
            logits, attention = [], []
            for bag in unit_ids:
                out, attn = model(bags[bag][0][None].to(dev), return_attention=True)
                logits.append(out.float())
                attention.append((attn[0], bags[bag][1]))
            return training.bag_outputs(task, unit_ids, units, unit, logits, attention)
        return predict

    @property
    def patches_per_bag(self) -> float:
        return self.mean_n

    def model_extras(self, task):
        return {**super().model_extras(task), "in_dim": self.in_dim, "encoder": self.encoder}


def cli(argv: list[str] | None = None) -> int:
    return training.main(argv, "e2epath train_mil", TwoStage, "features",
                         "the slides' feature files (results/features/{encoder}/{mag}x/{slide}.pt), or their "
                         "shard tables")
