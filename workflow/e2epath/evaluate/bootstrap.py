"""Bootstrapped metrics: per fold, pooled over folds, and paired differences between methods.

Pooled: the test cases of all folds in one table. Each fold's cases are scored by that fold's
model, and scores of different models share no scale (a model's risk offset, its calibration), so
the ranking metrics (AUC, C-index) compare only pairs of cases from the same test fold — the
pair-weighted mean of the fold values, as R's `concordance(... + strata(fold))`; accuracy-type
metrics pool the cases' decisions. Pooled resamples draw each fold's cases within that fold.

A resample is a multiplicity vector (how often each test case was drawn); the metrics of
`e2epath.metrics` take a matrix of them, so all resamples are computed at once. Cases are sorted by
case_id and resamples depend only on (seed, n, folds), so two methods evaluated on the same cases see
the same resamples — which is what the paired bootstrap needs. Resamples on which a metric is
undefined (a single class) are dropped and counted in the log. The ROC figure draws its band from
the same resampler (`resample_indices`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from e2epath.core import seeds
from e2epath.core.predictions import Cases

logger = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 22  # resamples × cases handled per chunk (32 MiB of float64 multiplicities)


@dataclass(frozen=True)
class Interval:
    point: float
    mean: float
    ci_low: float
    ci_high: float
    n_valid: int  # resamples on which the metric was defined


@dataclass(frozen=True)
class PairedInterval:
    diff_point: float
    diff_mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_valid: int


def resample_indices(n: int, n_boot: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) case indices drawn with replacement; a function of (n, n_boot, seed, strata) only.
    With ``strata`` (pooled test folds) each stratum is resampled within itself, so every resample
    keeps the folds' sizes, as the cross-validation design fixed them."""
    rng = seeds.bootstrap_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), int)
    idx = np.empty((n_boot, n), int)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        idx[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return idx


def multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float counts of each case per resample (one bincount for all rows)."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def resampled_metrics(cases: Cases, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics on every resample, in chunks of resamples to bound memory for large n."""
    chunk = max(1, _CHUNK_ELEMS // max(1, cases.n))
    parts = [cases.weighted(multiplicities(indices[s:s + chunk], cases.n))
             for s in range(0, indices.shape[0], chunk)]
    return {name: np.concatenate([p[name] for p in parts]) for name in cases.metric_names}


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float, float]:
    if values.size == 0:
        return np.nan, np.nan, np.nan
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(values.mean()), float(lo), float(hi)


def _log_dropped(what: str, name: str, n_valid: int, n_boot: int) -> None:
    if n_valid < n_boot:
        logger.warning("%s %s: %d of %d resamples dropped (metric undefined, e.g. a single class)",
                       what, name, n_boot - n_valid, n_boot)


def bootstrap(cases: Cases, n_boot: int, seed: int, alpha: float,
              what: str = "") -> dict[str, Interval]:
    """Point estimate, bootstrap mean and percentile interval of every metric of the task."""
    point = cases.point()
    values = resampled_metrics(cases, resample_indices(cases.n, n_boot, seed, cases.strata))
    out = {}
    for name, v in values.items():
        v = v[~np.isnan(v)]
        _log_dropped(what, name, v.size, n_boot)
        out[name] = Interval(point[name], *_percentiles(v, alpha), n_valid=int(v.size))
    return out


def paired_bootstrap(cases: Cases, reference: Cases, n_boot: int, seed: int,
                     alpha: float, what: str = "") -> dict[str, PairedInterval]:
    """Difference `cases − reference` on the same resampled cases. Two-sided bootstrap p-value
    2·min(P(d ≤ 0), P(d ≥ 0)) capped at 1, each tail counted as (k + 1) / (B + 1) so that a
    finite bootstrap never claims p = 0 (the smallest p of 1000 resamples is ≈ 0.002)."""
    if cases.unit != reference.unit or not np.array_equal(cases.ids, reference.ids):
        raise ValueError(f"{what}: paired bootstrap needs the same {cases.unit}s for both methods; "
                         "restrict both tables to their common ids first")
    folds = [np.full(c.n, -1) if c.strata is None else c.strata for c in (cases, reference)]
    if not np.array_equal(*folds):
        raise ValueError(f"{what}: the two methods put the same cases in different test folds")
    idx = resample_indices(cases.n, n_boot, seed, cases.strata)
    va, vb = resampled_metrics(cases, idx), resampled_metrics(reference, idx)
    pa, pb = cases.point(), reference.point()
    out = {}
    for name in cases.metric_names:
        d = va[name] - vb[name]
        d = d[~np.isnan(d)]
        _log_dropped(what, name, d.size, n_boot)
        mean, lo, hi = _percentiles(d, alpha)
        tails = (np.sum(d <= 0) + 1) / (d.size + 1), (np.sum(d >= 0) + 1) / (d.size + 1)
        p = min(1.0, 2 * min(tails)) if d.size else np.nan
        out[name] = PairedInterval(pa[name] - pb[name], mean, lo, hi, float(p), int(d.size))
    return out
