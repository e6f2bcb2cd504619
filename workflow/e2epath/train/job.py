"""One training job — a task × method × fold — whatever the family.

The skeleton (:func:`run`) is the same for end-to-end and two-stage training: read the fold's
cases and labels, seed, let the family load its bags (one per slide or per case: the task's `bag`
unit), drop bags without usable data (saying which), build the task and the model, draw each
epoch's bag order (with minority oversampling), train with model selection on validation
(`loop.fit`, which owns the checkpoint and the weights' moving average), predict the test subset
once, and write the run's files (`e2epath.layout`). What differs — the inputs, the model, how a
batch is drawn and how a full bag is predicted — is a :class:`Family`. Splits are by case: every
slide of a case is in the case's subset.

Seeds (`e2epath.core.seeds`): everything random in a job derives from ``TrainingJob.fold_seed``
(`seeds.job`), epoch e's bag order from ``TrainingJob.epoch_rng(e)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from e2epath.core import seeds
from e2epath.core.devices import torch_device
from e2epath.core.io import atomic_path
from e2epath.core.layout import CHECKPOINT, RUN_FILES, Run
from e2epath.data.bags import Bag
from e2epath.features.files import FeatureBag
from e2epath.sources.sheets import load_labels
from e2epath.train.attention import split_attention, write_attention
from e2epath.train.inference import predict_bag
from e2epath.train.loop import Checkpoint, FitResult, Predict, fit
from e2epath.train.modelfile import write_model
from e2epath.train.tasks import Task, build_task

logger = logging.getLogger(__name__)

SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class TrainingJob:
    """What a training job is given: the task, the fold, the seed, the method's resolved
    hyper-parameters (`methods.resolve_method`: they name the method and its family), the
    inputs every family reads, and the run's output files."""

    task: str
    fold: int
    seed: int
    spec: dict[str, Any]
    splits: Path
    labels: Path
    slides: Path
    outputs: dict[str, Path]  # the names of layout.RUN_FILES → paths, all in the run's folder
    pretrained: tuple[Path, ...] = ()  # the encoder's weights record or file (E2E)
    preprocess: dict[str, Any] | None = None  # the config's preprocess section: recorded for deployment

    def __post_init__(self) -> None:
        folders = {p.parent for p in self.outputs.values()}
        wrong = {k: p.name for k, p in self.outputs.items() if p.name != RUN_FILES[k]}
        if set(self.outputs) != set(RUN_FILES) or len(folders) != 1 or wrong:
            raise ValueError(f"a training run writes {', '.join(RUN_FILES.values())} into one folder "
                             f"(e2epath.layout); got {({k: str(p) for k, p in self.outputs.items()})}")

    @property
    def folder(self) -> Path:
        return self.outputs["run"].parent

    @property
    def fold_seed(self) -> int:
        """The seed of everything random in this job (the one seed formula)."""
        return seeds.job(self.seed, self.fold)

    def epoch_rng(self, epoch: int) -> np.random.Generator:
        """The generator of epoch ``epoch``'s bag order."""
        return seeds.epoch_rng(self.fold_seed, epoch)

    @property
    def run(self) -> Run:
        spec = self.spec
        return Run(spec["family"], self.task, spec["task_type"], spec["name"], self.fold, self.folder)


def parser(prog: str) -> argparse.ArgumentParser:
    """The arguments every training job takes; a family adds its inputs."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--splits", required=True, type=Path)
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--slides", required=True, type=Path, help="results/slides.tsv (slide → case)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--spec", required=True, help="the method's resolved hyper-parameters (JSON)")
    ap.add_argument("--pretrained", nargs="*", default=[], type=Path,
                    help="the encoder's weights: the encoder_weights record or the weights file (E2E; none for "
                         "random init or two-stage)")
    ap.add_argument("--preprocess", required=True,
                    help="the config's preprocess settings (JSON), recorded in the model file so that "
                         "`python -m e2epath predict` prepares new slides as the training ones")
    for name in RUN_FILES:
        ap.add_argument(f"--{name}", required=True, type=Path)
    return ap


def main(argv: list[str] | None, prog: str, family: type["Family"], help: str) -> int:
    """A training step's command line: the common arguments plus the family's inputs (``--inputs``)."""
    ap = parser(prog)
    ap.add_argument("--inputs", nargs="+", required=True, type=Path, help=help)
    args = ap.parse_args(argv)
    return run(job_from_args(args), family, args.inputs)


def job_from_args(args: argparse.Namespace) -> TrainingJob:
    return TrainingJob(args.task, args.fold, args.seed, json.loads(args.spec), args.splits, args.labels,
                       args.slides, {name: getattr(args, name) for name in RUN_FILES}, tuple(args.pretrained),
                       json.loads(args.preprocess))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_fold(job: TrainingJob) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The task's labels and the fold's case ids per subset (sorted)."""
    splits = pd.read_csv(job.splits, sep="\t", dtype={"case_id": str})
    part = splits[splits["fold"] == job.fold]
    if part.empty:
        raise SystemExit(f"{job.splits}: no rows for fold {job.fold}")
    cases = {s: sorted(part.loc[part["subset"] == s, "case_id"]) for s in SUBSETS}
    labels = load_labels(job.labels, job.task, job.spec["task_type"])
    logger.info("task %s, %s/%s fold %d: %s", job.task, job.spec["family"], job.spec["name"], job.fold,
                {k: len(v) for k, v in cases.items()})
    return labels, cases


def units_of(cases: dict[str, list[str]], units: dict[str, str], trainable: set[str]) -> dict[str, list[str]]:
    """The bags (``units``: unit → case) of each subset's cases — for training only the
    ``trainable`` ones — saying which cases lose bags and why; in (case, unit) order."""
    out = {}
    for subset, ids in cases.items():
        wanted = set(ids)
        allowed = trainable if subset == "train" else set(units)
        out[subset] = sorted((u for u in allowed if units[u] in wanted), key=lambda u: (units[u], u))
        gone = sorted(wanted - {units[u] for u in out[subset]})
        if gone:
            logger.warning("%s: %d case(s) without usable patches skipped: %s", subset, len(gone), ", ".join(gone))
    if not out["train"]:
        raise SystemExit("no training case has usable patches; check results/patches/manifest.tsv")
    if not out["val"]:
        raise SystemExit("no validation case has usable patches: model selection needs a validation subset "
                         "(it never looks at the test one); use a larger splits.val_fraction or check the slides")
    return out


def balanced_order(strata: np.ndarray, rng: np.random.Generator, oversample: float | None) -> np.ndarray:
    """An epoch's bag order. With ``oversample`` r, each stratum (class) smaller than the largest
    one's size / r is drawn up to that many bags, repeats drawn with replacement (r = 2: the paper's
    BRCA IDC:ILC = 2:1; r = 1: every class as large as the largest)."""
    index = np.arange(len(strata))
    if oversample and len(np.unique(strata)) > 1:
        groups = [index[strata == s] for s in np.unique(strata)]
        target = int(np.ceil(max(len(g) for g in groups) / oversample - 1e-9))
        index = np.concatenate([np.concatenate([g, rng.choice(g, target - len(g), replace=True)])
                                if len(g) < target else g for g in groups])
    return rng.permutation(index)


def bag_outputs(task: Task, unit_ids: list[str], units: dict[str, str], unit: str, logits: list[torch.Tensor],
                attention: list[tuple[torch.Tensor, list[tuple[str, np.ndarray]]]]) -> tuple[pd.DataFrame, dict]:
    """Per-bag logits → predictions, one row per bag (slide bags: a `slide_id` column before
    `case_id`), their mean loss in ``.attrs["loss"]``; per-bag attention [heads, N] split back into
    slides."""
    case_ids = [units[u] for u in unit_ids]
    if not unit_ids:
        preds = task.predictions([], torch.zeros(0, task.n_outputs))
    else:
        preds = task.predictions(case_ids, torch.cat(logits))
    if unit == "slide":
        preds.insert(0, "slide_id", unit_ids)
    if not unit_ids:
        return preds, {}
    logits = torch.cat(logits)
    targets = torch.stack([task.target(c) for c in case_ids]).to(logits.device)
    preds.attrs["loss"] = float(task.loss(logits, targets))  # breaks ties of the selection metric
    return preds, split_attention(attention)


@dataclass(frozen=True)
class TrainingData:
    """How a family draws its training steps: (epoch, bag order: indices into the training bags) →
    that epoch's (inputs, targets) steps; and the patches a training bag holds on average (the
    patches/s column of history.tsv)."""

    draw: Callable[[int, np.ndarray], Iterable]
    patches_per_bag: float


class Family(ABC):
    """What differs between end-to-end and two-stage training: the bags it reads (loaded when it is
    made), the model, and how training steps are drawn. Full bags are predicted by one path for both
    (`e2epath.train.inference.predict_bag`)."""

    bags: dict[str, Bag | FeatureBag]  # every bag of the fold's cases that can be predicted, by unit id

    def __init__(self, job: TrainingJob, inputs: list[Path], cases: list[str]) -> None:
        self.job, self.spec = job, job.spec

    @property
    def units(self) -> dict[str, str]:
        """bag → its case, for every bag that can be predicted."""
        return {u: b.case_id for u, b in self.bags.items()}

    @property
    @abstractmethod
    def trainable(self) -> set[str]:
        """The bags that can be trained on."""

    @abstractmethod
    def model(self, task: Task, dev: torch.device) -> torch.nn.Module:
        """A new model to train, on ``dev``."""

    @abstractmethod
    def training_data(self, task: Task, train: list[str], dev: torch.device) -> TrainingData:
        """How the ``train`` bags become training steps."""

    def model_record(self, task: Task) -> dict[str, Any]:
        """What the model file records besides weights and spec (`e2epath.train.modelfile`)."""
        edges = getattr(task, "edges", None)
        return {"classes": getattr(task, "classes", None), "bins": None if edges is None else edges.tolist(),
                "n_outputs": task.n_outputs}

    @property
    def encoder_record(self) -> dict[str, Any]:
        """The encoder the run's inputs came from (name, weights, path, sha256): run.json, tables."""
        raise NotImplementedError


def bag_predictor(task: Task, family: Family, dev: torch.device) -> Predict:
    """(model, bag ids) → (predictions, attention per slide) of those full bags (`inference.predict_bag`)."""
    spec, units = family.spec, family.units

    @torch.no_grad()
    def predict(model: torch.nn.Module, unit_ids: list[str]) -> tuple[pd.DataFrame, dict]:
        logits, attention = [], []
        for unit in unit_ids:
            out, attn, parts = predict_bag(model, family.bags[unit], spec, dev)
            logits.append(out)
            attention.append((attn, parts))
        return bag_outputs(task, unit_ids, units, spec["bag"], logits, attention)
    return predict


def run(job: TrainingJob, family_class: type[Family], inputs: list[Path]) -> int:
    """Train, select on validation, predict the test subset, write the run's files."""
    spec = job.spec
    seed_everything(job.fold_seed)
    labels, cases = load_fold(job)
    family = family_class(job, inputs, [c for ids in cases.values() for c in ids])
    units = family.units
    bags = units_of(cases, units, family.trainable)
    logger.info("%s bags: %s", spec["bag"], {k: len(v) for k, v in bags.items()})
    train = bags["train"]
    task = build_task(spec["task_type"], labels, sorted({units[u] for u in train}), spec.get("n_bins"))
    dev = torch_device()
    model = family.model(task, dev)
    strata = task.strata([units[u] for u in train])
    data = family.training_data(task, train, dev)

    def batches(epoch: int) -> Iterable:
        return data.draw(epoch, balanced_order(strata, job.epoch_rng(epoch), spec["oversample"]))

    predict = bag_predictor(task, family, dev)
    checkpoint = Checkpoint(job.folder / CHECKPOINT, spec)
    result = fit(model, task, batches, predict, bags["val"], spec, checkpoint, data.patches_per_bag)
    write_outputs(job, result, model, predict, bags["test"], family.model_record(task), family.encoder_record)
    checkpoint.finish()
    return 0


def write_outputs(job: TrainingJob, result: FitResult, model: torch.nn.Module, predict: Predict,
                  test_cases: list[str], record: dict[str, Any], encoder: dict[str, Any]) -> pd.DataFrame:
    """Predict the test subset with the validation-selected weights (raw or moving average, which
    the model file records as `weights`); write every file of the run (docs/contracts.md
    "Training outputs"), run.json last."""
    out = job.outputs
    model.load_state_dict(result.best_state)
    preds, attention = predict(model, test_cases)
    with atomic_path(out["predictions"]) as tmp:
        preds.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out["history"]) as tmp:
        result.history.to_csv(tmp, sep="\t", index=False)
    write_attention(out["attention"], job.spec["eval_magnification"], attention)
    write_model(out["model"], result.best_state, job.spec, best_epoch=result.best_epoch, weights=result.best_weights,
                task=job.task, fold=job.fold, seed=job.seed, preprocess=job.preprocess, encoder=encoder, **record)
    job.run.write(encoder)
    return preds
