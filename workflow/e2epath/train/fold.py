"""What E2E and two-stage training jobs share around the loop: arguments, the fold's cases,
the task, seeding, and turning per-case bag outputs into predictions + attention maps."""
from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..sheets import load_labels
from .tasks import Task, build_task

logger = logging.getLogger(__name__)


def parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--slides", required=True, help="results/slides.tsv (slide → case)")
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--spec", required=True, help="the method's resolved hyper-parameters (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default=None, help="task name, for messages")
    for name in ("model", "history", "predictions", "attention"):
        ap.add_argument(f"--{name}", required=True, type=Path)
    return ap


@dataclass
class Fold:
    spec: dict
    labels: pd.DataFrame
    cases: dict[str, list[str]]  # subset → case ids
    outputs: dict[str, Path]
    checkpoint: Path


def load_fold(args: argparse.Namespace) -> Fold:
    spec = json.loads(args.spec)
    seed_everything(args.seed * 1000 + args.fold)
    splits = pd.read_csv(args.splits, sep="\t", dtype={"case_id": str})
    part = splits[splits["fold"] == args.fold]
    if part.empty:
        raise SystemExit(f"{args.splits}: no rows for fold {args.fold}")
    cases = {s: sorted(part.loc[part["subset"] == s, "case_id"]) for s in ("train", "val", "test")}
    labels = load_labels(args.labels, args.task or spec.get("name", "task"), spec["task_type"])
    outputs = {k: getattr(args, k) for k in ("model", "history", "predictions", "attention")}
    logger.info("fold %d: %s", args.fold, {k: len(v) for k, v in cases.items()})
    return Fold(spec, labels, cases, outputs, args.model.parent / "checkpoint.pt")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_cases(fold: Fold, available: set[str], train_only: set[str] | None = None) -> None:
    """Drop cases without usable data from every subset, saying which.

    ``train_only``: the stricter set a training case must belong to (e.g. patches at a sampling
    magnification); defaults to ``available``.
    """
    for subset, ids in fold.cases.items():
        allowed = available if subset != "train" or train_only is None else train_only
        gone = [c for c in ids if c not in allowed]
        if gone:
            logger.warning("%s: %d case(s) without usable patches skipped: %s", subset, len(gone),
                           ", ".join(gone))
        fold.cases[subset] = [c for c in ids if c in allowed]
    if not fold.cases["train"]:
        raise SystemExit("no training case has usable patches; check results/patches/manifest.tsv")
    if not fold.cases["val"]:
        logger.warning("the validation subset is empty: every epoch scores NaN and the first epoch "
                       "is kept; use a larger splits.val_fraction")


def make_task(fold: Fold) -> Task:
    return build_task(fold.spec["task_type"], fold.labels, fold.cases["train"], fold.spec["n_bins"])


def bag_outputs(task: Task, case_ids: list[str], logits: list[torch.Tensor],
                attention: list[tuple[torch.Tensor, list[tuple[str, np.ndarray]]]]) -> tuple[pd.DataFrame, dict]:
    """Per-case logits → predictions (their mean loss in ``.attrs["loss"]``); per-case attention
    [heads, N] split back into slides."""
    if not case_ids:
        return task.predictions([], torch.zeros(0, task.n_outputs)), {}
    logits = torch.cat(logits)
    preds = task.predictions(case_ids, logits)
    targets = torch.stack([task.target(c) for c in case_ids]).to(logits.device)
    preds.attrs["loss"] = float(task.loss(logits, targets))  # breaks ties of the selection metric
    maps = {}
    for attn, parts in attention:
        start = 0
        for slide, coords in parts:
            maps[slide] = (attn[:, start:start + len(coords)].float().cpu().numpy(), coords)
            start += len(coords)
    return preds, maps


def spec_matches(checkpoint: Path, spec: dict) -> bool:
    """A checkpoint is resumed only for the very same hyper-parameters."""
    marker = checkpoint.with_suffix(".json")
    return checkpoint.exists() and marker.exists() and json.loads(marker.read_text()) == spec


def prepare_checkpoint(checkpoint: Path, spec: dict) -> None:
    if checkpoint.exists() and not spec_matches(checkpoint, spec):
        logger.info("hyper-parameters changed since %s was written: starting afresh", checkpoint)
        checkpoint.unlink()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.with_suffix(".json").write_text(json.dumps(spec, sort_keys=True))


def finish_checkpoint(checkpoint: Path) -> None:
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_suffix(".json").unlink(missing_ok=True)


def encoder_from_spec(name: str, weights: str | None, seed: int) -> torch.nn.Module:
    """``weights: auto`` = ImageNet when the torch cache has it, else random init (logged).

    Random init is seeded so every job of a run (e.g. each slide's feature extraction) builds
    the very same encoder.
    """
    from ..models import build_encoder

    torch.manual_seed(seed)
    if weights != "auto":
        return build_encoder(name, weights)
    try:
        return build_encoder(name, "imagenet")
    except FileNotFoundError as err:
        logger.warning("weights: auto — %s; using random init instead", err)
        torch.manual_seed(seed)
        return build_encoder(name, None)
