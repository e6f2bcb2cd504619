"""The `evaluate` step: bootstrapped metrics of every method of a task, per test fold and pooled
over the folds, and paired differences against a reference method.

A task whose bags are slides (`tasks.<task>.bag: slide`) is scored per slide — the unit the
models predict — and, additionally, per case: the mean of a case's slide probabilities (or
risks). Each row of the tables says its `unit`.

`python -m e2epath evaluate --task T --task-type TYPE --n-boot 1000 --seed 0 --out
results/metrics/T.tsv --paired-out results/metrics/T_paired.tsv [--reference METHOD] --runs RUN...`
with RUN = a training run's `run.json` (e2epath.layout): the run says its family, method and fold.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from ..layout import Run, load_tables, read_runs
from ..metrics import case_level, main_metric, prepare, unit_of
from ..vocabulary import TASK_TYPES
from .bootstrap import bootstrap, paired_bootstrap

logger = logging.getLogger(__name__)

COLUMNS = ["method", "family", "unit", "fold", "metric", "point", "mean", "ci_low", "ci_high", "n"]
PAIRED_COLUMNS = ["method", "reference", "unit", "fold", "metric", "diff_point", "diff_mean", "ci_low",
                  "ci_high", "p_value", "n"]


def primary_unit(metrics: pd.DataFrame) -> str:
    """The unit the models predict — slides where the task's bags are slides, else cases — whose
    rows tables and forest plots show (metrics.tsv holds case rows too)."""
    return "slide" if "slide" in set(metrics["unit"]) else "case"


def _write_tsv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def _pooled(folds: dict[int, pd.DataFrame], name: str) -> pd.DataFrame:
    """The folds' test rows in one table, each with its ``fold`` (the AUC / C-index stratum)."""
    pooled = pd.concat([folds[k].assign(fold=k) for k in sorted(folds)], ignore_index=True)
    n_folds = pooled.groupby(pooled["case_id"].astype(str))["fold"].nunique()
    if (n_folds > 1).any():
        raise ValueError(f"{name}: case {n_folds.idxmax()} is a test case in more than one fold; "
                         "check results/splits (each case must be tested exactly once)")
    return pooled


def unit_tables(task_type: str, folds: dict[int, pd.DataFrame]) -> dict[str, dict[int, pd.DataFrame]]:
    """unit → fold → predictions: slide rows as given plus their case means, or case rows."""
    unit = unit_of(next(iter(folds.values())))
    out = {unit: folds}
    if unit == "slide":
        out["case"] = {k: case_level(task_type, df) for k, df in folds.items()}
    return out


def _choose_reference(families: dict[str, str], pooled_main: dict[str, float], requested: str | None) -> str:
    if requested is not None:
        if requested not in families:
            raise ValueError(f"--reference {requested!r} is not among the methods {sorted(families)}")
        return requested
    twostage = [m for m, f in families.items() if f == "twostage" and not np.isnan(pooled_main[m])]
    if twostage:
        return max(twostage, key=lambda m: pooled_main[m])  # first wins a tie (run order)
    return next(iter(families))


def evaluate(runs: list[Run], task_type: str, n_boot: int, seed: int, reference: str | None = None,
             alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics rows (per unit, per fold + pooled, every method) and paired rows (per unit, pooled,
    vs the reference). The reference is chosen on the first unit (the bags the models predict)."""
    methods = load_tables(runs, "predictions")
    if not methods:
        raise ValueError("every predictions file is empty; nothing to evaluate")
    families = {method: family for family, method in methods}
    rows, pooled, pooled_main = [], {}, {}
    main = main_metric(task_type)
    for (family, name), folds in methods.items():
        for unit, unit_folds in unit_tables(task_type, folds).items():
            parts = [(k, unit_folds[k]) for k in sorted(unit_folds)] + [("pooled", _pooled(unit_folds, name))]
            for fold, df in parts:
                cases = prepare(task_type, df, strata="fold" if fold == "pooled" else None)
                intervals = bootstrap(cases, n_boot, seed, alpha, f"{name} {unit}s fold {fold}")
                for metric, iv in intervals.items():
                    rows.append([name, family, unit, fold, metric, iv.point, iv.mean, iv.ci_low, iv.ci_high, cases.n])
            pooled[name, unit] = parts[-1][1]
            pooled_main.setdefault(name, intervals[main].point)
    metrics = pd.DataFrame(rows, columns=COLUMNS)

    ref = _choose_reference(families, pooled_main, reference)
    logger.info("paired differences against reference %s", ref)
    paired = []
    for (name, unit), table in pooled.items():
        if name == ref or (ref, unit) not in pooled:
            continue
        key, other = f"{unit}_id", pooled[ref, unit]
        common = np.intersect1d(table[key].astype(str), other[key].astype(str))
        if len(common) < max(len(table), len(other)):
            logger.warning("%s vs %s: compared on the %d %ss both have predictions for", name, ref, len(common), unit)
        a, b = (prepare(task_type, t[t[key].astype(str).isin(common)], "fold") for t in (table, other))
        for metric, pv in paired_bootstrap(a, b, n_boot, seed, alpha, f"{name} − {ref} pooled {unit}s").items():
            paired.append([name, ref, unit, "pooled", metric, pv.diff_point, pv.diff_mean,
                           pv.ci_low, pv.ci_high, pv.p_value, a.n])
    return metrics, pd.DataFrame(paired, columns=PAIRED_COLUMNS)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--n-boot", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=0.05, help="1 − confidence level (0.05: 95%% interval)")
    ap.add_argument("--reference", default=None,
                    help="method the paired differences are taken against (default: best two-stage "
                         "method by pooled main metric, else the first method)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--paired-out", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="the training runs' run.json files")
    args = ap.parse_args(argv)
    if args.n_boot < 1 or not 0 < args.alpha < 1:
        ap.error("--n-boot must be ≥ 1 and --alpha in (0, 1)")
    try:
        runs = read_runs(args.runs, args.task)
        metrics, paired = evaluate(runs, args.task_type, args.n_boot, args.seed, args.reference, args.alpha)
    except (OSError, ValueError) as err:  # bad runs, predictions or arguments: say what to fix, no traceback
        logger.error("task %s: %s", args.task, err)
        return 2
    _write_tsv(metrics, args.out)
    _write_tsv(paired, args.paired_out)
    logger.info("task %s: wrote %s (%d rows) and %s (%d rows)", args.task, args.out, len(metrics),
                args.paired_out, len(paired))
    return 0
