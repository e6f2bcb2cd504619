"""Patient-level train / val / test splits, stratified and seeded.

A case (patient) is the unit: all of its slides share one subset, so no patient leaks from
training into its own test set. Classification and grading stratify by label; survival by
event × time bin (falling back to event only when a stratum is too small).
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from .io import atomic_path
from .sheets import load_labels

logger = logging.getLogger(__name__)


class SplitError(ValueError):
    pass


def strata(labels: pd.DataFrame, task_type: str, needed: int) -> np.ndarray:
    """The stratification key of each case (survival: the finest key with ``needed`` per stratum)."""
    if task_type != "survival":
        return labels["label"].astype(str).to_numpy()
    event = labels["event"].astype(int).astype(str)
    time_bin = pd.qcut(labels["time"].rank(method="first"), 2, labels=["early", "late"]).astype(str)
    for name, key in (("event x time bin", event + "_" + time_bin), ("event", event)):
        if key.value_counts().min() >= needed:
            logger.info("survival: stratifying by %s", name)
            return key.to_numpy()
    logger.warning("survival: too few censored or uncensored cases to stratify; splitting unstratified")
    return np.zeros(len(labels), dtype=int).astype(str)


def _check_counts(key: np.ndarray, needed: int, what: str) -> None:
    counts = pd.Series(key).value_counts()
    small = counts[counts < needed]
    if len(small):
        detail = ", ".join(f"{k!r}: {v} case(s)" for k, v in small.items())
        raise SplitError(f"cannot stratify {what}: {detail}; each class needs at least {needed} cases. "
                         "Use fewer folds (splits.k), the holdout mode, or merge rare classes.")


def _carve_val(train_idx: np.ndarray, key: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    stratify = key[train_idx]
    if pd.Series(stratify).value_counts().min() < 2:
        logger.warning("a stratum has fewer than 2 training cases: validation carved unstratified "
                       "(it may miss a class; use fewer folds or more cases)")
        stratify = None
    tr, va = train_test_split(train_idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def kfold(labels: pd.DataFrame, task_type: str, k: int, val_fraction: float, seed: int) -> pd.DataFrame:
    key = strata(labels, task_type, k)
    _check_counts(key, k, f"into {k} folds")
    cases = labels["case_id"].to_numpy()
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    rows = []
    for fold, (train_idx, test_idx) in enumerate(skf.split(cases, key)):
        tr, va = _carve_val(train_idx, key, val_fraction, seed + fold)
        for subset, idx in (("train", tr), ("val", va), ("test", test_idx)):
            rows += [(c, fold, subset) for c in cases[idx]]
    return pd.DataFrame(rows, columns=["case_id", "fold", "subset"])


def holdout(labels: pd.DataFrame, task_type: str, fractions: list[float], seed: int) -> pd.DataFrame:
    f_train, f_val, f_test = (f / sum(fractions) for f in fractions)
    key = strata(labels, task_type, 3)
    _check_counts(key, 3, "into train / val / test")
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=f_test, random_state=seed, stratify=key)
    tr, va = _carve_val(rest, key, f_val / (f_train + f_val), seed)
    cases = labels["case_id"].to_numpy()
    rows = [(cases[i], 0, s) for s, ids in (("train", tr), ("val", va), ("test", test)) for i in ids]
    return pd.DataFrame(rows, columns=["case_id", "fold", "subset"])


def make_splits(labels: pd.DataFrame, task_type: str, mode: str, k: int, val_fraction: float,
                holdout_fractions: list[float], seed: int) -> pd.DataFrame:
    labels = labels.sort_values("case_id").reset_index(drop=True)  # order-independent result
    if mode == "kfold":
        return kfold(labels, task_type, k, val_fraction, seed)
    return holdout(labels, task_type, holdout_fractions, seed)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath splits")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--slides", required=True, help="results/slides.tsv (cases that have slides)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True)
    ap.add_argument("--mode", default="kfold", choices=["kfold", "holdout"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--holdout", type=float, nargs=3, default=[0.7, 0.1, 0.2])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cases = set(pd.read_csv(a.slides, sep="\t", dtype=str)["case_id"])
    labels = load_labels(a.labels, a.task, a.task_type, cases)
    splits = make_splits(labels, a.task_type, a.mode, a.k, a.val_fraction, a.holdout, a.seed)
    for fold, part in splits.groupby("fold"):
        counts = part["subset"].value_counts().to_dict()
        logger.info("task %s fold %s: %s cases", a.task, fold, counts)
    with atomic_path(a.out) as tmp:
        splits.to_csv(tmp, sep="\t", index=False)
    return 0
