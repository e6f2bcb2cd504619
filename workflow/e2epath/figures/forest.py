"""Forest plot: the task's main metric per method, pooled bootstrap mean with its 95 % interval,
E2E methods above two-stage ones; each fold's point estimate is a small grey dot. Labelled
external cohorts get a panel each, beside the internal one (the fold models' ensemble; grey: each
fold model)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from e2epath.core.vocabulary import FAMILIES, FAMILY_LABELS, INTERNAL, METRIC_LABELS
from e2epath.evaluate.evaluation import (
    COLUMNS,
    cohort_order,
    headline,
    headline_fold,
    primary_unit,
)
from e2epath.figures.common import FigureSkipped

logger = logging.getLogger(__name__)

ROW_IN = 0.35


def read_metrics(path) -> pd.DataFrame:
    """The metrics table of `e2epath evaluate`; the error names the file and the missing columns."""
    df = pd.read_csv(path, sep="\t", dtype={"method": str, "fold": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: metrics table lacks column(s) {missing} (see docs/contracts.md Evaluation)")
    return df


def forest_rows(metrics: pd.DataFrame, metric: str, cohort: str = INTERNAL) -> pd.DataFrame:
    """Headline rows of ``metric`` for the models' unit in ``cohort`` (internal: pooled test folds;
    external: the ensemble), E2E first then two-stage, each in table order."""
    rows = headline(metrics)
    rows = rows[(rows["metric"] == metric) & (rows["cohort"] == cohort)]
    if rows.empty:
        raise FigureSkipped(f"the metrics table has no {headline_fold(cohort)} {metric!r} rows of cohort {cohort}")
    rank = {f: i for i, f in enumerate(FAMILIES)}
    rows = rows.assign(_r=rows["family"].map(lambda f: rank.get(f, len(rank))))
    return rows.sort_values(["_r"], kind="stable").drop(columns="_r").reset_index(drop=True)


def plot_forest(metrics: pd.DataFrame, metric: str, title: str = "") -> Figure:
    """One panel per cohort (internal first, then the labelled external ones) on shared rows."""
    unit = primary_unit(metrics)
    cohorts = cohort_order(metrics)
    rows = forest_rows(metrics, metric)
    # y positions from the top, with a header line per family
    labels, ys, heads, y = [], [], [], 0
    for family, group in rows.groupby("family", sort=False):
        heads.append((y, FAMILY_LABELS[family]))
        y += 1
        for i in group.index:
            labels.append(rows.loc[i, "method"])
            ys.append(y)
            y += 1
    fig = Figure(figsize=(7.0 * len(cohorts), 1.2 + ROW_IN * y), layout="constrained")
    axes = fig.subplots(1, len(cohorts), squeeze=False)[0]
    for ax, cohort in zip(axes, cohorts):
        _panel(ax, metrics, metric, unit, cohort, labels, ys, heads, y, first=ax is axes[0])
    if len(cohorts) > 1:
        fig.suptitle(title or "Methods compared")
    else:
        axes[0].set_title(title or "Methods compared")
    return fig


def _panel(ax, metrics: pd.DataFrame, metric: str, unit: str, cohort: str, methods: list[str], ys: list[int],
           heads: list[tuple[int, str]], height: int, first: bool) -> None:
    """One cohort's intervals; folds (internal: each test fold; external: each fold model) as grey dots."""
    try:
        rows = forest_rows(metrics, metric, cohort).set_index("method")
    except FigureSkipped:
        rows = pd.DataFrame(columns=["family", "mean", "ci_low", "ci_high", "n"])
    per_fold = metrics[(metrics["metric"] == metric) & (metrics["unit"] == unit) & (metrics["cohort"] == cohort)
                       & ~metrics["fold"].astype(str).isin(["pooled", "ensemble", "folds"])]
    shown = []
    for method, yy in zip(methods, ys):
        if method not in rows.index:
            shown.append("not scored")
            continue
        r = rows.loc[method]
        folds = per_fold[per_fold["method"] == method]["point"].to_numpy(float)
        ax.plot(folds, np.full(len(folds), yy), "o", ms=3, color="0.6", zorder=1)
        ax.plot([r["ci_low"], r["ci_high"]], [yy, yy], "-", color="k", lw=1.5, zorder=2)
        ax.plot([r["mean"]], [yy], "s", ms=7, color="C0" if r["family"] == "e2e" else "C1", zorder=3)
        shown.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  n={int(r['n'])}")
    if first:
        ax.set_yticks([*ys, *(h for h, _ in heads)], [*methods, *(t for _, t in heads)])
        for tick in ax.get_yticklabels()[len(ys):]:  # family headers
            tick.set_fontweight("bold")
    else:
        ax.set_yticks([])
    ax.set_ylim(height - 0.5, -0.7)
    right = ax.twinx()  # the numbers as right-hand tick labels, so the layout makes room for them
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ys, shown, fontsize=8)
    right.tick_params(length=0)
    if metric in ("auc", "c_index"):
        ax.axvline(0.5, color="grey", ls=":", lw=1)  # chance level
    if metric == "qwk":
        ax.axvline(0.0, color="grey", ls=":", lw=1)
    what = ("pooled bootstrap mean, 95 % CI (grey: folds)" if cohort == INTERNAL
            else "ensemble bootstrap mean, 95 % CI (grey: fold models)")
    ax.set_xlabel(f"{METRIC_LABELS[metric]} per {unit} — {what}")
    ax.set_title(cohort if cohort != INTERNAL else f"{INTERNAL} (test folds)", fontsize=10)
