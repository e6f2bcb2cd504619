"""Forest plot: the task's main metric per method, pooled bootstrap mean with its 95 % interval,
E2E methods above two-stage ones; each fold's point estimate is a small grey dot."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from e2epath.evaluate.evaluation import COLUMNS, primary_unit
from e2epath.figures.common import FigureSkipped
from e2epath.vocabulary import FAMILIES, FAMILY_LABELS, METRIC_LABELS

logger = logging.getLogger(__name__)

ROW_IN = 0.35


def read_metrics(path) -> pd.DataFrame:
    """The metrics table of `e2epath evaluate`; the error names the file and the missing columns."""
    df = pd.read_csv(path, sep="\t", dtype={"method": str, "fold": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: metrics table lacks column(s) {missing} (see docs/contracts.md Evaluation)")
    return df


def forest_rows(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Pooled rows of ``metric`` for the models' unit, E2E first then two-stage, each in table order."""
    metrics = metrics[metrics["unit"] == primary_unit(metrics)]
    pooled = metrics[(metrics["metric"] == metric) & (metrics["fold"].astype(str) == "pooled")]
    if pooled.empty:
        raise FigureSkipped(f"the metrics table has no pooled {metric!r} rows")
    rank = {f: i for i, f in enumerate(FAMILIES)}
    pooled = pooled.assign(_r=pooled["family"].map(lambda f: rank.get(f, len(rank))))
    return pooled.sort_values(["_r"], kind="stable").drop(columns="_r").reset_index(drop=True)


def plot_forest(metrics: pd.DataFrame, metric: str, title: str = "") -> Figure:
    rows = forest_rows(metrics, metric)
    unit = primary_unit(metrics)
    per_fold = metrics[(metrics["metric"] == metric) & (metrics["fold"].astype(str) != "pooled")
                       & (metrics["unit"] == unit)]
    # y positions from the top, with a header line per family
    labels, ys, heads, y = [], [], [], 0
    for family, group in rows.groupby("family", sort=False):
        heads.append((y, FAMILY_LABELS[family]))
        y += 1
        for i in group.index:
            labels.append(i)
            ys.append(y)
            y += 1
    fig = Figure(figsize=(7.0, 1.2 + ROW_IN * y), layout="constrained")
    ax = fig.subplots()
    for i, yy in zip(labels, ys):
        r = rows.loc[i]
        folds = per_fold[per_fold["method"] == r["method"]]["point"].to_numpy(float)
        ax.plot(folds, np.full(len(folds), yy), "o", ms=3, color="0.6", zorder=1)
        ax.plot([r["ci_low"], r["ci_high"]], [yy, yy], "-", color="k", lw=1.5, zorder=2)
        ax.plot([r["mean"]], [yy], "s", ms=7, color="C0" if r["family"] == "e2e" else "C1", zorder=3)
    ax.set_yticks([*ys, *(h for h, _ in heads)],
                  [*(rows.loc[i, "method"] for i in labels), *(t for _, t in heads)])
    for tick in ax.get_yticklabels()[len(ys):]:  # family headers
        tick.set_fontweight("bold")
    ax.set_ylim(y - 0.5, -0.7)
    right = ax.twinx()  # the numbers as right-hand tick labels, so the layout makes room for them
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ys, [f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  n={int(r['n'])}"
                          for r in (rows.loc[i] for i in labels)], fontsize=8)
    right.tick_params(length=0)
    if metric in ("auc", "c_index"):
        ax.axvline(0.5, color="grey", ls=":", lw=1)  # chance level
    if metric == "qwk":
        ax.axvline(0.0, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"{METRIC_LABELS[metric]} per {unit} — pooled bootstrap mean, 95 % CI (grey: folds)")
    ax.set_title(title or "Methods compared")
    return fig
