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

from e2epath.core import seeds
from e2epath.core.io import atomic_path
from e2epath.core.vocabulary import SPLIT_MODES, TASK_TYPES
from e2epath.sources.sheets import load_labels

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


def _split_off(idx: np.ndarray, key: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``fraction`` of ``idx`` off as ``what``, stratified by ``key``.

    The part gets at least one case of every stratum when the strata allow it (a validation set
    without one class makes AUC undefined and model selection blind); otherwise the split is
    unstratified with a warning.
    """
    if fraction <= 0:
        return np.sort(idx), idx[:0]
    stratify = key[idx]
    n_strata = len(np.unique(stratify))
    n_part = max(1, round(fraction * len(idx)))
    if pd.Series(stratify).value_counts().min() >= 2 and len(idx) - n_part >= n_strata:
        if n_part < n_strata:
            logger.info("%s: %d case(s) instead of %d so that each of the %d strata is present",
                        what, n_strata, n_part, n_strata)
        n_part = max(n_part, n_strata)
    else:
        logger.warning("%s: a stratum has fewer than 2 cases here, so %s is drawn unstratified and may "
                       "miss a class; use fewer folds or more cases", what, what)
        stratify = None
    rest, part = train_test_split(idx, test_size=n_part, random_state=seed, stratify=stratify)
    return np.sort(rest), np.sort(part)


def kfold(labels: pd.DataFrame, task_type: str, k: int, val_fraction: float, seed: int) -> pd.DataFrame:
    key = strata(labels, task_type, k)
    _check_counts(key, k, f"into {k} folds")
    cases = labels["case_id"].to_numpy()
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seeds.split(seed))
    rows = []
    for fold, (train_idx, test_idx) in enumerate(skf.split(cases, key)):
        tr, va = _split_off(train_idx, key, val_fraction, seeds.validation(seed, fold), f"fold {fold} validation")
        for subset, idx in (("train", tr), ("val", va), ("test", test_idx)):
            rows += [(c, fold, subset) for c in cases[idx]]
    return pd.DataFrame(rows, columns=["case_id", "fold", "subset"])


def holdout(labels: pd.DataFrame, task_type: str, fractions: list[float], seed: int) -> pd.DataFrame:
    f_train, f_val, f_test = (f / sum(fractions) for f in fractions)
    key = strata(labels, task_type, 3)
    _check_counts(key, 3, "into train / val / test")
    idx = np.arange(len(labels))
    rest, test = _split_off(idx, key, f_test, seeds.split(seed), "test")
    tr, va = _split_off(rest, key, f_val / (f_train + f_val), seeds.validation(seed, 0), "validation")
    cases = labels["case_id"].to_numpy()
    rows = [(cases[i], 0, s) for s, ids in (("train", tr), ("val", va), ("test", test)) for i in ids]
    return pd.DataFrame(rows, columns=["case_id", "fold", "subset"])


def make_splits(labels: pd.DataFrame, task_type: str, mode: str, k: int, val_fraction: float,
                holdout_fractions: list[float], seed: int) -> pd.DataFrame:
    """Rows (case_id, fold, subset): every case is tested in exactly one fold (kfold) or once (holdout)."""
    if mode not in SPLIT_MODES:
        raise SplitError(f"unknown split mode {mode!r}; use one of {', '.join(SPLIT_MODES)}")
    if mode == "kfold" and k < 2:
        raise SplitError(f"splits.k = {k}: k-fold needs at least 2 folds (or use the holdout mode)")
    if mode == "kfold" and not 0 < val_fraction < 1:
        raise SplitError(f"splits.val_fraction = {val_fraction} must be in (0, 1): model selection needs a "
                         "validation subset (it never looks at the test one)")
    if mode == "holdout" and (len(holdout_fractions) != 3 or min(holdout_fractions) <= 0):
        raise SplitError(f"splits.holdout = {holdout_fractions} must be three fractions above 0 (train, "
                         "validation, test): model selection needs a validation subset")
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
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--mode", required=True, choices=SPLIT_MODES)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--val-fraction", type=float, required=True)
    ap.add_argument("--holdout", type=float, nargs=3, required=True, help="train, val, test fractions")
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    cases = set(pd.read_csv(a.slides, sep="\t", dtype=str)["case_id"])
    labels = load_labels(a.labels, a.task, a.task_type, cases)
    try:
        splits = make_splits(labels, a.task_type, a.mode, a.k, a.val_fraction, a.holdout, a.seed)
    except SplitError as err:
        raise SystemExit(f"e2epath splits, task {a.task} ({a.labels}): {err}") from None
    for fold, part in splits.groupby("fold"):
        counts = part["subset"].value_counts().to_dict()
        logger.info("task %s fold %s: %s cases", a.task, fold, counts)
    with atomic_path(a.out) as tmp:
        splits.to_csv(tmp, sep="\t", index=False)
    return 0
