"""Training curves from ``history.tsv``: training loss and validation metric per epoch.

One colour per method (E2E solid, two-stage dashed); each fold is a thin line, the mean over the
folds that reached an epoch a thick one.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from e2epath.figures.common import FAMILY_STYLE, FigureSkipped, method_colors, ordered

logger = logging.getLogger(__name__)

PANELS = (("train_loss", "training loss"), ("val_metric", "validation metric"))


def check_history(df: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in ("epoch", "train_loss", "val_metric") if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: history.tsv lacks column(s) {missing} (see docs/contracts.md)")
    return df.sort_values("epoch")


def plot_curves(histories: dict[tuple[str, str], dict[int, pd.DataFrame]], val_label: str = "",
                title: str = "") -> Figure:
    keys = ordered(histories)
    if not keys:
        raise FigureSkipped("no training histories")
    colors = method_colors(keys)
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for key in keys:
        folds = {k: check_history(df, f"{key[1]} fold {k}") for k, df in histories[key].items()}
        style = FAMILY_STYLE.get(key[0], "-")
        for ax, (col, _) in zip(axes, PANELS):
            for df in folds.values():
                ax.plot(df["epoch"], df[col], style, color=colors[key], lw=0.7, alpha=0.45)
            mean = pd.concat(folds.values()).groupby("epoch")[col].mean()
            ax.plot(mean.index, mean.to_numpy(float), style, color=colors[key], lw=2.0,
                    label=f"{key[1]} ({len(folds)} folds)")
    for ax, (col, label) in zip(axes, PANELS):
        ax.set(xlabel="epoch", ylabel=val_label if col == "val_metric" and val_label else label, title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    if all(np.isnan(l.get_ydata(orig=True).astype(float)).all() for l in axes[1].lines):
        logger.warning("training curves: every validation metric is NaN (no validation split?)")
    return fig
