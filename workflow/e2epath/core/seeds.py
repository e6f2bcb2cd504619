"""Every random choice of a run, each seeded from the config's ``seed`` by one formula per use.

| use | seed |
|---|---|
| splits: the test folds (k-fold) or the test subset (holdout) | `split(seed)` = seed |
| splits: the validation cases of fold k's training cases | `validation(seed, k)` = seed + k |
| a training job (task × method × fold k): Python, NumPy and torch generators | `job(seed, k)` = seed · 1000 + k |
| its bag order of epoch e (with minority oversampling) | `epoch_rng(job, e)`: generator of [job, e] |
| its training bag at position i of epoch e: the patches, then their crop boxes | `bag_rng(job, e, i)`, `bag_rng(job, e, i, 1)` |
| an encoder's random initialisation (E2E from scratch, two-stage features) | `encoder(seed)` = seed: the same layers in every fold and feature job |
| bootstrap resamples (metrics, paired differences, ROC bands) | `bootstrap_rng(seed)` |
| the slides shown in a task's attention figure | `figure_rng(seed)` |

The demo cohorts have seeds of their own (`demo.seed`, `cohorts.<name>.demo.seed`): they make data,
not results. A job's outputs do not depend on the number of loader workers or decoding threads.
"""
from __future__ import annotations

import numpy as np


def split(seed: int) -> int:
    """The seed of the test folds (k-fold) or of the test subset (holdout)."""
    return seed


def validation(seed: int, fold: int) -> int:
    """The seed of the validation cases drawn from fold ``fold``'s training cases."""
    return seed + fold


def job(seed: int, fold: int) -> int:
    """The seed of everything random in a training job of fold ``fold``."""
    return seed * 1000 + fold


def epoch_rng(job_seed: int, epoch: int) -> np.random.Generator:
    """The generator of a training job's bag order in ``epoch``."""
    return np.random.default_rng([job_seed, epoch])


def bag_rng(job_seed: int, epoch: int, position: int, part: int | None = None) -> np.random.Generator:
    """The generator of the training bag at ``position`` of ``epoch``'s order: its patches
    (``part`` None), then its augmentation (``part`` 1). A bag drawn twice in an epoch (oversampling)
    gets two samples; the same whatever the number of loader workers."""
    key = [job_seed, epoch, position] if part is None else [job_seed, epoch, position, part]
    return np.random.default_rng(key)


def encoder(seed: int) -> int:
    """The seed an encoder is randomly initialised with: the run's, so every fold and every feature
    job builds the very same layers."""
    return seed


def bootstrap_rng(seed: int) -> np.random.Generator:
    """The generator of bootstrap resamples: a function of the seed alone, so two methods scored on
    the same cases see the same resamples."""
    return np.random.default_rng(seed)


def figure_rng(seed: int) -> np.random.Generator:
    """The generator of a figure's seeded choices (which slides the attention panel shows)."""
    return np.random.default_rng(seed)
