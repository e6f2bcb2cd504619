"""The `evaluate` step: bootstrapped metrics of every method of a task, per test fold and pooled
over the folds, and paired differences against a reference method.

A task whose bags are slides (`tasks.<task>.bag: slide`) is scored per slide — the unit the
models predict — and, additionally, per case: the mean of a case's slide probabilities (or
risks). Each row of the tables says its `unit`.

External cohorts (config `cohorts:`) with labels for the task add rows of their own `cohort`
(the training cohort's rows say `internal`): the fold models' ensemble (`fold` = `ensemble`), each
fold model (`fold` = its number) and the fold models' mean ± sd (`fold` = `folds`: `point` and
`mean` the mean of the fold models' point estimates, `sd` their standard deviation), with bootstrap
intervals as for internal results; paired comparisons per cohort on the ensembles.

`python -m e2epath evaluate --task T --task-type TYPE --n-boot 1000 --seed 0 --out
results/metrics/T.tsv --paired-out results/metrics/T_paired.tsv [--reference METHOD] --runs RUN...
[--cohorts RECORD...]` with RUN = a training run's `run.json` (e2epath.layout): the run says its
family, method and fold; RECORD = an external cohort's `prediction.json` (`predict_cohort`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from e2epath.core import schema
from e2epath.core.io import atomic_path, read_json
from e2epath.core.layout import Run, load_tables, read_runs, read_table
from e2epath.core.metrics import main_metric
from e2epath.core.predictions import case_level, prepare, unit_of
from e2epath.core.vocabulary import INTERNAL, TASK_TYPES
from e2epath.evaluate.bootstrap import bootstrap, paired_bootstrap

logger = logging.getLogger(__name__)

COLUMNS = ["cohort", "method", "family", "unit", "fold", "metric", "point", "mean", "ci_low", "ci_high", "sd", "n"]
PAIRED_COLUMNS = ["cohort", "method", "reference", "unit", "fold", "metric", "diff_point", "diff_mean", "ci_low",
                  "ci_high", "p_value", "n"]
# The row that stands for a method in a cohort: the pooled test folds (internal), the ensemble (external).
HEADLINE = {INTERNAL: "pooled"}
ENSEMBLE = "ensemble"
FOLDS = "folds"  # external: the fold models' mean ± sd


def headline_fold(cohort: str) -> str:
    return HEADLINE.get(cohort, ENSEMBLE)


def headline(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each method's headline rows per cohort (pooled test folds; external: the ensemble) in the
    models' unit — what tables and forest plots show."""
    metrics = metrics[metrics["unit"] == primary_unit(metrics)]
    want = metrics["cohort"].map(headline_fold)
    return metrics[metrics["fold"].astype(str) == want]


def cohort_order(metrics: pd.DataFrame) -> list[str]:
    """The cohorts of a metrics table: internal first, then the external ones as they come."""
    seen = list(dict.fromkeys(metrics["cohort"]))
    return sorted(seen, key=lambda c: c != INTERNAL)


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


def load_cohort(path: Path) -> tuple[dict, dict[int, pd.DataFrame], pd.DataFrame]:
    """An external cohort's predictions by one method: (record, fold → the fold model's
    predictions, the ensemble), rows without a label left out (predicted, not scored)."""
    rec = read_json(path)
    folder = Path(path).parent

    def labelled(df: pd.DataFrame) -> pd.DataFrame:
        cols = ["time", "event"] if rec["task_type"] == "survival" else ["label"]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: the predictions lack {missing}; cohort {rec['cohort']} has no labels for "
                             f"task {rec['task']}")
        return df.dropna(subset=cols).reset_index(drop=True)

    folds = {int(k): labelled(read_table(folder / name)) for k, name in zip(rec["folds"], rec["predictions"])}
    ensemble = labelled(read_table(folder / rec["ensemble"]))
    n_all = len(read_table(folder / rec["ensemble"]))
    if len(ensemble) < n_all:
        logger.info("cohort %s, %s: %d of %d %ss have no label — predicted, not scored", rec["cohort"],
                    rec["method"], n_all - len(ensemble), n_all, rec["bag"])
    return rec, folds, ensemble


def external(records: list[Path], task_type: str, n_boot: int, seed: int, alpha: float
             ) -> tuple[list[list], dict[tuple[str, str, str], pd.DataFrame], dict[str, str]]:
    """Metrics rows of the external cohorts; the ensembles per (cohort, method, unit) for paired
    comparisons; the methods' families."""
    rows, ensembles, families = [], {}, {}
    for path in records:
        rec, folds, ens = load_cohort(path)
        cohort, name, family = rec["cohort"], rec["method"], rec["family"]
        families[name] = family
        if ens.empty:
            logger.warning("cohort %s, %s: no labelled %s — no metrics", cohort, name, rec["bag"])
            continue
        parts = {ENSEMBLE: ens, **folds}
        for unit, unit_parts in unit_tables(task_type, parts).items():
            points: dict[str, list[float]] = {}
            for fold, df in unit_parts.items():
                cases = prepare(task_type, df)
                intervals = bootstrap(cases, n_boot, seed, alpha, f"{cohort} {name} {unit}s {fold}")
                for metric, iv in intervals.items():
                    rows.append([cohort, name, family, unit, fold, metric, iv.point, iv.mean, iv.ci_low, iv.ci_high,
                                 np.nan, cases.n])
                    if fold != ENSEMBLE:
                        points.setdefault(metric, []).append(iv.point)
            for metric, values in points.items():
                v = np.asarray(values, float)
                mean = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
                sd = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else np.nan
                rows.append([cohort, name, family, unit, FOLDS, metric, mean, mean, np.nan, np.nan, sd,
                             len(unit_parts[ENSEMBLE])])
            ensembles[cohort, name, unit] = unit_parts[ENSEMBLE]
    return rows, ensembles, families


def _paired_rows(cohort: str, fold: str, tables: dict[tuple[str, str], pd.DataFrame], ref: str, task_type: str,
                 n_boot: int, seed: int, alpha: float, strata: str | None) -> list[list]:
    """Paired differences of every method against ``ref`` on the units both predicted."""
    out = []
    for (name, unit), table in tables.items():
        if name == ref or (ref, unit) not in tables:
            continue
        key, other = f"{unit}_id", tables[ref, unit]
        common = np.intersect1d(table[key].astype(str), other[key].astype(str))
        if len(common) < max(len(table), len(other)):
            logger.warning("%s vs %s (%s): compared on the %d %ss both have predictions for", name, ref, cohort,
                           len(common), unit)
        a, b = (prepare(task_type, t[t[key].astype(str).isin(common)], strata) for t in (table, other))
        what = f"{cohort}: {name} − {ref} {fold} {unit}s"
        for metric, pv in paired_bootstrap(a, b, n_boot, seed, alpha, what).items():
            out.append([cohort, name, ref, unit, fold, metric, pv.diff_point, pv.diff_mean,
                        pv.ci_low, pv.ci_high, pv.p_value, a.n])
    return out


def evaluate(runs: list[Run], task_type: str, n_boot: int, seed: int, alpha: float, reference: str | None = None,
             cohorts: list[Path] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics rows (per unit, per fold + pooled, every method; then each external cohort's) and
    paired rows (per cohort and unit, vs the reference). The reference is chosen on the internal
    pooled results of the first unit (the bags the models predict)."""
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
                    rows.append([INTERNAL, name, family, unit, fold, metric, iv.point, iv.mean, iv.ci_low,
                                 iv.ci_high, np.nan, cases.n])
            pooled[name, unit] = parts[-1][1]
            pooled_main.setdefault(name, intervals[main].point)
    ext_rows, ensembles, ext_families = external(list(cohorts), task_type, n_boot, seed, alpha)
    unknown = sorted(set(ext_families) - set(families))
    if unknown:
        raise ValueError(f"external predictions of {unknown}, a method without internal runs; give the runs of "
                         "every method whose cohort predictions are given")
    metrics = pd.DataFrame(rows + ext_rows, columns=COLUMNS)

    ref = _choose_reference(families, pooled_main, reference)
    logger.info("paired differences against reference %s", ref)
    paired = _paired_rows(INTERNAL, "pooled", pooled, ref, task_type, n_boot, seed, alpha, "fold")
    for cohort in dict.fromkeys(c for c, _, _ in ensembles):
        tables = {(name, unit): t for (c, name, unit), t in ensembles.items() if c == cohort}
        paired += _paired_rows(cohort, ENSEMBLE, tables, ref, task_type, n_boot, seed, alpha, None)
    return metrics, pd.DataFrame(paired, columns=PAIRED_COLUMNS)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--n-boot", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--alpha", type=schema.arg_type("evaluate", "alpha"), required=True,
                    help="1 − confidence level (0.05: 95%% intervals)")
    ap.add_argument("--reference", default=None,
                    help="method the paired differences are taken against (default: best two-stage "
                         "method by pooled main metric, else the first method)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--paired-out", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="the training runs' run.json files")
    ap.add_argument("--cohorts", nargs="*", required=True, type=Path,
                    help="external cohorts' prediction.json (predict_cohort) of cohorts labelled for the task")
    args = ap.parse_args(argv)
    if args.n_boot < 1:
        ap.error("--n-boot must be ≥ 1")
    try:
        runs = read_runs(args.runs, args.task)
        metrics, paired = evaluate(runs, args.task_type, args.n_boot, args.seed, args.alpha, args.reference,
                                   args.cohorts)
    except (OSError, ValueError) as err:  # bad runs, predictions or arguments: say what to fix, no traceback
        logger.error("task %s: %s", args.task, err)
        return 2
    _write_tsv(metrics, args.out)
    _write_tsv(paired, args.paired_out)
    logger.info("task %s: wrote %s (%d rows) and %s (%d rows)", args.task, args.out, len(metrics),
                args.paired_out, len(paired))
    return 0
