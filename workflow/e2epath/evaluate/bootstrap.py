"""Bootstrapped metrics: per fold, pooled over folds, and paired differences between methods.

Pooled: the test cases of all folds in one table. Each fold's cases are scored by that fold's
model, and scores of different models share no scale (a model's risk offset, its calibration), so
the ranking metrics (AUC, C-index) compare only pairs of cases from the same test fold — the
pair-weighted mean of the fold values, as R's `concordance(... + strata(fold))`; accuracy-type
metrics pool the cases' decisions. Pooled resamples draw each fold's cases within that fold.

A resample is a multiplicity vector (how often each test case was drawn); the metrics of
`metrics.py` take a matrix of them, so all resamples are computed at once. Cases are sorted by
case_id and resamples depend only on (seed, n, folds), so two methods evaluated on the same cases see
the same resamples — which is what the paired bootstrap needs. Resamples on which a metric is
undefined (a single class) are dropped and counted in the log.

`python -m e2epath evaluate --task T --task-type TYPE --out results/metrics/T.tsv
[--paired-out results/metrics/T_paired.tsv] [--reference METHOD] [--n-boot 1000] [--seed 0] PRED...`
with PRED = results/{e2e|twostage}/{task}/{method}/fold{k}/predictions.tsv.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from .metrics import TASK_TYPES, Cases, main_metric, prepare

logger = logging.getLogger(__name__)

FAMILIES = ("e2e", "twostage")
COLUMNS = ["method", "family", "fold", "metric", "point", "mean", "ci_low", "ci_high", "n_cases"]
PAIRED_COLUMNS = ["method", "reference", "fold", "metric", "diff_point", "diff_mean", "ci_low",
                  "ci_high", "p_value", "n_cases"]
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
    rng = np.random.default_rng(seed)
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


def bootstrap(cases: Cases, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
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


def paired_bootstrap(cases: Cases, reference: Cases, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05, what: str = "") -> dict[str, PairedInterval]:
    """Difference `cases − reference` on the same resampled cases. Two-sided bootstrap p-value
    2·min(P(d ≤ 0), P(d ≥ 0)) capped at 1, each tail counted as (k + 1) / (B + 1) so that a
    finite bootstrap never claims p = 0 (the smallest p of 1000 resamples is ≈ 0.002)."""
    if not np.array_equal(cases.case_id, reference.case_id):
        raise ValueError(f"{what}: paired bootstrap needs the same cases for both methods; "
                         "restrict both tables to their common case_ids first")
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


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------

_PRED_RE = re.compile(r"fold(\d+)$")


@dataclass(frozen=True)
class PredFile:
    path: Path
    family: str
    task: str
    method: str
    fold: int


def parse_pred_path(path: str | Path) -> PredFile:
    """results/{family}/{task}/{method}/fold{k}/predictions.tsv → its parts."""
    p = Path(path)
    parts = p.parts
    m = _PRED_RE.match(parts[-2]) if len(parts) >= 5 else None
    if m is None or parts[-5] not in FAMILIES:
        raise ValueError(f"{path}: expected results/{{e2e|twostage}}/{{task}}/{{method}}/fold{{k}}/"
                         "predictions.tsv")
    return PredFile(p, parts[-5], parts[-4], parts[-3], int(m.group(1)))


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions table with ids and labels kept as text; a 0-byte file reads as no rows."""
    try:
        return pd.read_csv(path, sep="\t", dtype={"case_id": str, "label": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _display_names(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """`method`, or `family/method` where the same method name exists in both families."""
    count: dict[str, int] = {}
    for _, method in keys:
        count[method] = count.get(method, 0) + 1
    return {(f, m): (m if count[m] == 1 else f"{f}/{m}") for f, m in keys}


def _write_tsv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def _load(files: list[PredFile], task: str) -> dict[tuple[str, str], dict[int, pd.DataFrame]]:
    methods: dict[tuple[str, str], dict[int, pd.DataFrame]] = {}
    for f in files:
        if f.task != task:
            raise ValueError(f"{f.path}: belongs to task {f.task!r}, not --task {task!r}")
        df = read_predictions(f.path)
        folds = methods.setdefault((f.family, f.method), {})
        if len(df) == 0:
            logger.warning("%s: no rows (empty test fold) — skipped", f.path)
            continue
        if f.fold in folds:
            raise ValueError(f"{f.path}: fold {f.fold} of {f.family}/{f.method} given twice")
        folds[f.fold] = df
    for (family, method), folds in methods.items():
        if not folds:
            logger.warning("%s/%s: every fold is empty — method left out", family, method)
    return {k: v for k, v in methods.items() if v}


def _pooled(folds: dict[int, pd.DataFrame], name: str) -> pd.DataFrame:
    """The folds' test cases in one table, each with its ``fold`` (the AUC / C-index stratum)."""
    pooled = pd.concat([folds[k].assign(fold=k) for k in sorted(folds)], ignore_index=True)
    dup = pooled["case_id"][pooled["case_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{name}: case {dup.iloc[0]} is a test case in more than one fold; "
                         "check results/splits (each case must be tested exactly once)")
    return pooled


def _choose_reference(names: dict[tuple[str, str], str], pooled_main: dict[tuple[str, str], float],
                      requested: str | None) -> tuple[str, str]:
    if requested is not None:
        hits = [k for k, v in names.items() if requested in (v, f"{k[0]}/{k[1]}")]
        if not hits:
            raise ValueError(f"--reference {requested!r} is not among the methods {sorted(names.values())}")
        return hits[0]
    twostage = [k for k in names if k[0] == "twostage" and not np.isnan(pooled_main[k])]
    if twostage:
        return max(twostage, key=lambda k: pooled_main[k])  # first wins a tie (command-line order)
    return next(iter(names))


def evaluate(files: list[PredFile], task: str, task_type: str, n_boot: int = 1000, seed: int = 0,
             reference: str | None = None, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics rows (per fold + pooled, every method) and paired rows (pooled, vs the reference)."""
    methods = _load(files, task)
    if not methods:
        raise ValueError(f"task {task}: every predictions file is empty; nothing to evaluate")
    names = _display_names(list(methods))
    rows, pooled_cases, pooled_main = [], {}, {}
    main = main_metric(task_type)
    for key, folds in methods.items():
        name = names[key]
        parts = [(k, folds[k]) for k in sorted(folds)] + [("pooled", _pooled(folds, name))]
        for fold, df in parts:
            cases = prepare(task_type, df, strata="fold" if fold == "pooled" else None)
            intervals = bootstrap(cases, n_boot, seed, alpha, f"{name} fold {fold}")
            for metric, iv in intervals.items():
                rows.append([name, key[0], fold, metric, iv.point, iv.mean, iv.ci_low, iv.ci_high, cases.n])
        pooled_cases[key] = parts[-1][1]
        pooled_main[key] = intervals[main].point
    metrics = pd.DataFrame(rows, columns=COLUMNS)

    ref = _choose_reference(names, pooled_main, reference)
    logger.info("task %s: paired differences against reference %s", task, names[ref])
    paired = []
    for key in methods:
        if key == ref:
            continue
        common = np.intersect1d(pooled_cases[key]["case_id"].astype(str), pooled_cases[ref]["case_id"].astype(str))
        if len(common) < max(len(pooled_cases[key]), len(pooled_cases[ref])):
            logger.warning("%s vs %s: compared on the %d cases both have predictions for",
                           names[key], names[ref], len(common))
        a, b = (prepare(task_type, pooled_cases[k][pooled_cases[k]["case_id"].astype(str).isin(common)], "fold")
                for k in (key, ref))
        what = f"{names[key]} − {names[ref]} pooled"
        for metric, pv in paired_bootstrap(a, b, n_boot, seed, alpha, what).items():
            paired.append([names[key], names[ref], "pooled", metric, pv.diff_point, pv.diff_mean,
                           pv.ci_low, pv.ci_high, pv.p_value, a.n])
    return metrics, pd.DataFrame(paired, columns=PAIRED_COLUMNS)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.05, help="1 − confidence level (0.05: 95%% interval)")
    ap.add_argument("--reference", default=None,
                    help="method the paired differences are taken against (default: best two-stage "
                         "method by pooled main metric, else the first method)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--paired-out", type=Path, default=None)
    ap.add_argument("predictions", nargs="+", help="results/{e2e|twostage}/{task}/{method}/fold{k}/predictions.tsv")
    args = ap.parse_args(argv)
    if args.n_boot < 1 or not 0 < args.alpha < 1:
        ap.error("--n-boot must be ≥ 1 and --alpha in (0, 1)")
    try:
        files = [parse_pred_path(p) for p in args.predictions]
    except ValueError as err:
        ap.error(str(err))
    try:
        metrics, paired = evaluate(files, args.task, args.task_type, args.n_boot, args.seed,
                                   args.reference, args.alpha)
    except ValueError as err:  # bad predictions or arguments: say what to fix, no traceback
        logger.error("%s", err)
        return 2
    _write_tsv(metrics, args.out)
    if args.paired_out is not None:
        _write_tsv(paired, args.paired_out)
    logger.info("task %s: wrote %s (%d rows)%s", args.task, args.out, len(metrics),
                f" and {args.paired_out} ({len(paired)} rows)" if args.paired_out else "")
    return 0
