"""Two-stage MIL: an aggregator trained on frozen features of full bags (batch size 1).

Same job skeleton, splits, loop, tasks, model selection and outputs as E2E (`job`); only the
inputs and the model differ.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import read_records
from ..models import build_aggregator
from . import job as training

logger = logging.getLogger(__name__)


def load_feature_bags(slides_tsv: str | Path, paths: list[str | Path], cases: set[str],
                      unit: str = "case", encoders: dict | None = None
                      ) -> tuple[dict[str, tuple[torch.Tensor, list]], dict[str, str]]:
    """(bag → (features [N, D] float32, [(slide, coords)]), bag → case) from the per-slide feature
    files, or from shard tables (JSON) listing them; one bag per case (its slides in slide-id
    order) or per slide (``unit``). ``encoders``, when given, collects each file's encoder record
    (name and weights) by checkpoint hash: features of one bag set must come from one checkpoint."""
    case_of = pd.read_csv(slides_tsv, sep="\t", dtype=str).set_index("slide_id")["case_id"].to_dict()
    files = [p for p in paths if not str(p).endswith(".json")]
    files += [r["path"] for r in read_records(p for p in paths if str(p).endswith(".json"))]
    parts: dict[str, list] = {}
    units: dict[str, str] = {}
    for path in sorted(files, key=lambda p: Path(p).name):
        rec = torch.load(path, map_location="cpu", weights_only=True)
        if encoders is not None and rec.get("encoder_weights") is not None:
            weights = {"name": rec.get("encoder"), **rec["encoder_weights"]}
            encoders.setdefault(weights.get("sha256"), weights)
        case = case_of.get(rec["slide_id"])
        if case not in cases:
            continue
        if rec["status"] != "ok" or len(rec["features"]) == 0:
            logger.info("skip slide %s: %s", rec["slide_id"], rec.get("message") or rec["status"])
            continue
        bag = case if unit == "case" else rec["slide_id"]
        units[bag] = case
        parts.setdefault(bag, []).append((rec["slide_id"], rec["features"].float(), rec["coords"].numpy()))
    bags = {b: (torch.cat([f for _, f, _ in p]), [(s, xy) for s, _, xy in p]) for b, p in parts.items()}
    return bags, units


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
