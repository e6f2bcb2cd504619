"""The one training loop shared by E2E and two-stage training.

It owns what both share: optimiser and cosine schedule with warm-up, AMP on CUDA, gradient
accumulation, an exponential moving average of the weights (`WeightAverage`, the recipe's `ema`),
per-epoch checkpoints with resume (`Checkpoint`), model selection and early stopping on the
**validation** subset only: after every epoch the raw weights and, with `ema`, their moving average
are both scored on validation, and the better of the two competes for the checkpoint. The test
subset is predicted once, after training, with the selected weights (`job.write_outputs`). What
differs (how a batch is drawn, how a full bag is predicted) comes in as two callables.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from e2epath.core.devices import torch_device
from e2epath.core.io import atomic_path
from e2epath.core.predictions import task_metrics
from e2epath.train.tasks import Task

logger = logging.getLogger(__name__)

# (inputs, targets) for one optimisation step; inputs are what the model's forward takes (a tuple:
# its positional arguments).
Batches = Callable[[int], Iterable[tuple[Any, torch.Tensor]]]
# (model, bag ids) → (predictions DataFrame, {slide_id: (attention [heads, N], coords [N, 2])})
Predict = Callable[[torch.nn.Module, list[str]], tuple[pd.DataFrame, dict]]


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_state: dict
    best_weights: str  # "raw" or "ema": which weights won on validation


class WeightAverage:
    """An exponential moving average of a model's weights: after every optimiser step each
    floating-point entry of the state (parameters and buffers such as BatchNorm statistics)
    becomes θ̄ ← m·θ̄ + (1 − m)·θ; integer entries are copied (timm's ModelEmaV3, as the authors)."""

    def __init__(self, model: torch.nn.Module, momentum: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema, new = [], []
        for avg, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                ema.append(avg)
                new.append(value)
            else:
                avg.copy_(value)
        torch._foreach_lerp_(ema, new, 1.0 - self.momentum)


# The optimiser class of each name a method may give (e2epath.core.vocabulary.OPTIMIZERS).
OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params, spec: dict) -> torch.optim.Optimizer:
    return OPTIMIZER_CLASSES[spec["optimizer"]](params, lr=spec["lr"], weight_decay=spec["weight_decay"])


class Checkpoint:
    """A job's training state after each epoch (model, optimiser, grad scaler, loop state), so a
    rerun after a crash continues at the next epoch. It is resumed only for the very same
    hyper-parameters (recorded beside it) and removed once the job's outputs are written."""

    def __init__(self, path: Path, spec: dict) -> None:
        self.path, self.spec = Path(path), spec
        self.marker = self.path.with_suffix(".json")
        if self.path.exists() and not self._matches():
            logger.info("hyper-parameters changed since %s was written: starting afresh", self.path)
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps(spec, sort_keys=True))

    def _matches(self) -> bool:
        return self.marker.exists() and json.loads(self.marker.read_text()) == self.spec

    def load(self) -> dict | None:
        return torch.load(self.path, map_location="cpu", weights_only=True) if self.path.exists() else None

    def save(self, model, opt, scaler, state: dict, ema: WeightAverage | None) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "ema": ema.module.state_dict() if ema else None, "state": state}, tmp)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """Linear warm-up, then cosine annealing to 0 (per epoch)."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _better(value: float, loss: float, best: tuple[float, float] | None) -> bool:
    """Higher validation metric wins; on a tie (tiny validation sets saturate AUC / C-index at 1)
    the lower validation loss; NaN never beats a number."""
    if best is None:
        return True
    best_value, best_loss = best
    if math.isnan(value) and math.isnan(best_value):  # metric undefined (e.g. one class): loss decides
        return loss < best_loss
    if math.isnan(value):
        return False
    if math.isnan(best_value) or value > best_value:
        return True
    return value == best_value and loss < best_loss


def _score(predict: Predict, model: torch.nn.Module, val_ids: list[str], spec: dict) -> tuple[float, float]:
    """(validation metric, validation loss) of ``model``."""
    val_df, _ = predict(model, val_ids)
    if not len(val_df):
        return float("nan"), val_df.attrs.get("loss", float("nan"))
    value = task_metrics(spec["task_type"], val_df).get(spec["select_on"], float("nan"))
    return value, val_df.attrs.get("loss", float("nan"))


def fit(model: torch.nn.Module, task: Task, batches: Batches, predict: Predict,
        val_ids: list[str], spec: dict, checkpoint: Checkpoint, patches_per_bag: float) -> FitResult:
    """Train ``model``; resume from ``checkpoint`` when it holds a state; select on validation only.

    After every epoch the raw weights and (with ``spec["ema"]``) their moving average are scored on
    the validation bags with ``spec["select_on"]`` (ties: the lower validation loss); the better of
    the two is the epoch's candidate, and the best candidate over the epochs is returned. Early
    stopping: no better candidate for ``patience`` epochs, never before epoch ``min_epochs``. The
    checkpoint is written atomically after every epoch, so a rerun after a crash continues at the
    next epoch with the same history.
    """
    dev = torch_device()
    opt = build_optimizer(model.parameters(), spec)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    ema = WeightAverage(model, spec["ema"]) if spec.get("ema") else None
    state = {"epoch": 0, "best": None, "best_epoch": -1, "best_state": None, "best_weights": "raw", "history": [],
             "bad": 0, "stopped": False}
    saved = checkpoint.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):  # empty when written without CUDA
            scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.module.load_state_dict(saved["ema"])
        state = saved["state"]
        logger.info("resuming from %s at epoch %d", checkpoint.path, state["epoch"])
    metric = spec["select_on"]
    epochs = spec["epochs"]
    todo = range(state["epoch"], state["epoch"] if state["stopped"] else epochs)
    for epoch in tqdm(todo, desc="epochs", initial=state["epoch"], total=epochs):
        for group in opt.param_groups:
            group["lr"] = spec["lr"] * lr_factor(epoch, epochs, spec["warmup_epochs"])
        t0 = time.perf_counter()
        loss, n_bags = train_epoch(model, task, batches(epoch), opt, scaler, spec["accumulate"], dev, ema=ema)
        seconds = time.perf_counter() - t0
        scores = {"raw": _score(predict, model, val_ids, spec)}
        if ema is not None:
            scores["ema"] = _score(predict, ema.module, val_ids, spec)
        which = "ema" if ema is not None and _better(*scores["ema"], scores["raw"]) else "raw"
        state["history"].append({"epoch": epoch, "train_loss": loss, "val_metric": scores["raw"][0],
                                 "val_metric_ema": scores["ema"][0] if ema is not None else float("nan"),
                                 "lr": opt.param_groups[0]["lr"], "seconds": round(seconds, 3),
                                 "patches_per_s": round(n_bags * patches_per_bag / max(seconds, 1e-9), 1)})
        logger.info("epoch %d: train loss %.4f, val %s %s (%.1fs)", epoch, loss, metric,
                    ", ".join(f"{k} {v:.4f} (loss {l:.4f})" for k, (v, l) in scores.items()), seconds)
        if _better(*scores[which], state["best"]):
            chosen = ema.module if which == "ema" else model
            state.update(best=scores[which], best_epoch=epoch, best_weights=which, bad=0,
                         best_state=copy.deepcopy({k: v.cpu() for k, v in chosen.state_dict().items()}))
        else:
            state["bad"] += 1
        state["epoch"] = epoch + 1
        state["stopped"] = bool(spec.get("patience")) and state["bad"] >= spec["patience"] \
            and epoch > spec.get("min_epochs", 0)
        checkpoint.save(model, opt, scaler, state, ema)
        if state["stopped"]:
            logger.info("early stop: val %s has not improved for %d epochs", metric, state["bad"])
            break
    logger.info("selected epoch %d, %s weights, on validation (%s, loss) = %s", state["best_epoch"],
                state["best_weights"], metric, state["best"])
    return FitResult(pd.DataFrame(state["history"]), state["best_epoch"], state["best_state"], state["best_weights"])


def train_epoch(model, task: Task, batches, opt, scaler, accumulate: int, dev,
                amp: bool | None = None, ema: WeightAverage | None = None) -> tuple[float, int]:
    """One pass over ``batches``; returns (mean loss per step, bags seen). ``ema`` is updated after
    every optimiser step.

    ``amp``: autocast to fp16 (default: on CUDA only; the CPU trains in fp32).
    """
    amp = dev.type == "cuda" if amp is None else amp
    model.train()
    total, n, bags = 0.0, 0, 0
    opt.zero_grad(set_to_none=True)
    for step, (inputs, target) in enumerate(batches, start=1):
        with torch.autocast(dev.type, enabled=amp):
            logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss = task.loss(logits, target.to(dev))
        scaler.scale(loss / accumulate).backward()
        if step % accumulate == 0:
            _step(opt, scaler, model, ema)
        total, n, bags = total + float(loss.detach()), n + 1, bags + len(target)
    if n % accumulate:  # a last, partial accumulation group still updates the weights
        _step(opt, scaler, model, ema)
    return total / max(n, 1), bags


def _step(opt, scaler, model, ema: WeightAverage | None) -> None:
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
