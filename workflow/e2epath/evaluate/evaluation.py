"""The `evaluate` step: bootstrapped metrics of every method of a task, per test fold and pooled
over the folds, and paired differences against a reference method.

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
from ..metrics import main_metric, prepare
from ..vocabulary import TASK_TYPES
from .bootstrap import bootstrap, paired_bootstrap

logger = logging.getLogger(__name__)

COLUMNS = ["method", "family", "fold", "metric", "point", "mean", "ci_low", "ci_high", "n_cases"]
PAIRED_COLUMNS = ["method", "reference", "fold", "metric", "diff_point", "diff_mean", "ci_low",
                  "ci_high", "p_value", "n_cases"]


def _write_tsv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def _pooled(folds: dict[int, pd.DataFrame], name: str) -> pd.DataFrame:
    """The folds' test cases in one table, each with its ``fold`` (the AUC / C-index stratum)."""
    pooled = pd.concat([folds[k].assign(fold=k) for k in sorted(folds)], ignore_index=True)
    dup = pooled["case_id"][pooled["case_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{name}: case {dup.iloc[0]} is a test case in more than one fold; "
                         "check results/splits (each case must be tested exactly once)")
    return pooled


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
    """Metrics rows (per fold + pooled, every method) and paired rows (pooled, vs the reference)."""
    methods = load_tables(runs, "predictions")
    if not methods:
        raise ValueError("every predictions file is empty; nothing to evaluate")
    families = {method: family for family, method in methods}
    rows, pooled_cases, pooled_main = [], {}, {}
    main = main_metric(task_type)
    for (family, name), folds in methods.items():
        parts = [(k, folds[k]) for k in sorted(folds)] + [("pooled", _pooled(folds, name))]
        for fold, df in parts:
            cases = prepare(task_type, df, strata="fold" if fold == "pooled" else None)
            intervals = bootstrap(cases, n_boot, seed, alpha, f"{name} fold {fold}")
            for metric, iv in intervals.items():
                rows.append([name, family, fold, metric, iv.point, iv.mean, iv.ci_low, iv.ci_high, cases.n])
        pooled_cases[name] = parts[-1][1]
        pooled_main[name] = intervals[main].point
    metrics = pd.DataFrame(rows, columns=COLUMNS)

    ref = _choose_reference(families, pooled_main, reference)
    logger.info("paired differences against reference %s", ref)
    paired = []
    for name in families:
        if name == ref:
            continue
        common = np.intersect1d(pooled_cases[name]["case_id"].astype(str), pooled_cases[ref]["case_id"].astype(str))
        if len(common) < max(len(pooled_cases[name]), len(pooled_cases[ref])):
            logger.warning("%s vs %s: compared on the %d cases both have predictions for", name, ref, len(common))
        a, b = (prepare(task_type, pooled_cases[m][pooled_cases[m]["case_id"].astype(str).isin(common)], "fold")
                for m in (name, ref))
        for metric, pv in paired_bootstrap(a, b, n_boot, seed, alpha, f"{name} − {ref} pooled").items():
            paired.append([name, ref, "pooled", metric, pv.diff_point, pv.diff_mean,
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
