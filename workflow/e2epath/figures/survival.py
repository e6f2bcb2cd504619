"""Kaplan–Meier curves of predicted high- vs low-risk patients, one panel per method.

Within each test fold the cases are split at the median predicted risk of that fold (risk above
the median → high risk), so no threshold is learnt from the test set of another fold; the folds'
groups are then pooled and compared with the log-rank test (lifelines).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.figure import Figure

from e2epath.core.vocabulary import FAMILY_LABELS
from e2epath.figures.common import FigureSkipped, ordered

logger = logging.getLogger(__name__)

PANEL_IN = 4.0  # each panel is PANEL_IN × PANEL_IN inches
HIGH, LOW = "#c0392b", "#2471a3"


def median_split(folds: dict[int, pd.DataFrame], name: str = "") -> pd.DataFrame:
    """Pooled ``case_id, fold, time, event, risk, high`` with ``high`` = risk > the fold's median."""
    parts = []
    for fold in sorted(folds):
        df = folds[fold]
        missing = [c for c in ("case_id", "time", "event", "risk") if c not in df.columns]
        if missing:
            raise ValueError(f"{name} fold {fold}: survival predictions lack column(s) {missing}")
        risk = df["risk"].to_numpy(float)
        parts.append(pd.DataFrame({"case_id": df["case_id"].astype(str), "fold": fold,
                                   "time": df["time"].to_numpy(float), "event": df["event"].to_numpy(int),
                                   "risk": risk, "high": risk > np.median(risk)}))
    return pd.concat(parts, ignore_index=True)


def logrank_p(split: pd.DataFrame) -> float:
    """Log-rank p-value of high vs low risk; NaN when a group is empty."""
    hi, lo = split[split["high"]], split[~split["high"]]
    if hi.empty or lo.empty:
        return float("nan")
    return float(logrank_test(hi["time"], lo["time"], hi["event"], lo["event"]).p_value)


def plot_km(methods: dict[tuple[str, str], dict[int, pd.DataFrame]], title: str = "") -> Figure:
    """A row of square panels, one per method: KM of high vs low predicted risk + log-rank p."""
    keys = ordered(methods)
    if not keys:
        raise FigureSkipped("no survival predictions")
    fig = Figure(figsize=(PANEL_IN * len(keys), PANEL_IN), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keys), sharex=True, sharey=True))
    for ax, key in zip(axes, keys):
        split = median_split(methods[key], key[1])
        p = logrank_p(split)
        for group, color, label in ((True, HIGH, "high risk"), (False, LOW, "low risk")):
            g = split[split["high"] == group]
            if g.empty:
                continue
            kmf = KaplanMeierFitter(label=f"{label} (n={len(g)})")
            kmf.fit(g["time"], g["event"])
            kmf.plot_survival_function(ax=ax, color=color, ci_show=True, ci_alpha=0.12,
                                       show_censors=True, censor_styles={"ms": 4, "marker": "|"})
        if np.isnan(p):
            logger.warning("KM: %s — one risk group is empty (all predicted risks tied); no log-rank test",
                           key[1])
        ptxt = "n/a" if np.isnan(p) else (f"= {p:.2g}" if p >= 1e-4 else "< 1e-4")
        ax.set_title(f"{key[1]} ({FAMILY_LABELS[key[0]]})\nlog-rank p {ptxt}", fontsize=9)
        ax.set(xlabel="time", ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("survival probability")
    if title:
        fig.suptitle(title)
    return fig
