"""What differs between task types: targets, loss, and how logits become predictions.

* classification / grading: cross-entropy; predictions are class probabilities.
* survival: discrete-time negative log-likelihood over `n_bins` intervals whose edges are
  quantiles of the uncensored times **of the training fold** (never of val/test);
  risk = −Σ_t S(t), so a higher risk means an earlier event.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from e2epath.core.predictions import class_order


class Task:
    """Base: `targets` (per case), `loss(logits, target)`, `predictions(case_ids, logits)`."""

    n_outputs: int

    def __init__(self, labels: pd.DataFrame) -> None:
        self.labels = labels.set_index("case_id")

    def target(self, case_id: str) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predictions(self, case_ids: list[str], logits: torch.Tensor) -> pd.DataFrame:
        raise NotImplementedError

    def strata(self, case_ids: list[str]) -> np.ndarray:
        """Group key for minority oversampling (None-like for survival)."""
        return np.zeros(len(case_ids), dtype=int)


class ClassificationTask(Task):
    def __init__(self, labels: pd.DataFrame) -> None:
        super().__init__(labels)
        self.classes = class_order(self.labels["label"].astype(str).unique())
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.n_outputs = len(self.classes)

    def target(self, case_id: str) -> torch.Tensor:
        return torch.tensor(self.index[str(self.labels.at[case_id, "label"])])

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)

    def predictions(self, case_ids: list[str], logits: torch.Tensor) -> pd.DataFrame:
        df = pd.DataFrame({"case_id": case_ids,
                           "label": [str(self.labels.at[c, "label"]) for c in case_ids]})
        return pd.concat([df, scores("classification", logits, self.classes)], axis=1)

    def strata(self, case_ids: list[str]) -> np.ndarray:
        return np.array([self.index[str(self.labels.at[c, "label"])] for c in case_ids])


class SurvivalTask(Task):
    def __init__(self, labels: pd.DataFrame, train_cases: list[str], n_bins: int) -> None:
        super().__init__(labels)
        train = self.labels.loc[train_cases]
        uncensored = train.loc[train["event"] == 1, "time"].to_numpy(float)
        if len(uncensored) < n_bins:
            raise ValueError(f"survival: only {len(uncensored)} uncensored training cases for "
                             f"{n_bins} time bins; lower tasks.<task>.n_bins")
        edges = np.quantile(uncensored, np.linspace(0, 1, n_bins + 1))
        self.edges = edges[1:-1]  # inner edges: bin = number of inner edges <= time
        self.n_outputs = n_bins

    def target(self, case_id: str) -> torch.Tensor:
        time = float(self.labels.at[case_id, "time"])
        event = int(self.labels.at[case_id, "event"])
        return torch.tensor([float(np.searchsorted(self.edges, time, side="right")), float(event)])

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_survival(logits.float(), target[:, 0].long(), target[:, 1])

    def predictions(self, case_ids: list[str], logits: torch.Tensor) -> pd.DataFrame:
        df = pd.DataFrame({
            "case_id": case_ids,
            "time": [float(self.labels.at[c, "time"]) for c in case_ids],
            "event": [int(self.labels.at[c, "event"]) for c in case_ids],
        })
        return pd.concat([df, scores("survival", logits)], axis=1)


def scores(task_type: str, logits: torch.Tensor, classes: list[str] | None = None) -> pd.DataFrame:
    """Logits [n, outputs] → the prediction columns: ``prob_<class>`` per class (softmax), or
    ``risk`` (survival: minus the expected survival over the bins, higher = earlier event).
    Shared by training's test predictions and `python -m e2epath predict`."""
    if task_type == "survival":
        surv = torch.cumprod(1 - torch.sigmoid(logits.float()), dim=-1)
        return pd.DataFrame({"risk": (-surv.sum(dim=-1)).cpu().numpy()})
    prob = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return pd.DataFrame({f"prob_{c}": prob[:, i] for i, c in enumerate(classes or [])})


def nll_survival(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor,
                 eps: float = 1e-7) -> torch.Tensor:
    """Discrete-time NLL: an event in bin k survived bins < k and died in k; censored survived ≤ k."""
    hazard = torch.sigmoid(logits)
    surv = torch.cumprod(1 - hazard, dim=-1)
    surv_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=-1)  # S(-1) = 1
    k = bins.unsqueeze(1)
    s_before = surv_pad.gather(1, k).clamp_min(eps)
    h_k = hazard.gather(1, k).clamp_min(eps)
    s_k = surv_pad.gather(1, k + 1).clamp_min(eps)
    uncensored = -(event.unsqueeze(1)) * (torch.log(s_before) + torch.log(h_k))
    censored = -(1 - event.unsqueeze(1)) * torch.log(s_k)
    return (uncensored + censored).mean()


def build_task(task_type: str, labels: pd.DataFrame, train_cases: list[str], n_bins: int | None = None) -> Task:
    """The task of ``task_type``; ``n_bins`` (survival only) time intervals from ``train_cases``."""
    if task_type == "survival":
        if n_bins is None:
            raise ValueError("a survival task needs n_bins (tasks.<task>.n_bins)")
        return SurvivalTask(labels, train_cases, n_bins)
    return ClassificationTask(labels)
