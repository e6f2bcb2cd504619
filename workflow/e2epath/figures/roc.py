"""ROC curves per method, pooled over the test folds, with a bootstrap band.

Binary tasks use the probability of the second class (classes in numeric order when every name is
a number, else string order — as the evaluation does); more than two classes give the macro
average of the one-vs-rest curves (mean TPR on a common FPR grid), whose AUC is the mean of the
per-class AUCs (= scikit-learn ``roc_auc_score(multi_class="ovr", average="macro")``). The band is
the 2.5–97.5 % percentile of the TPR at each grid FPR over case-level bootstrap resamples.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from e2epath.evaluate.metrics import class_order
from e2epath.figures.common import (FAMILY_LABEL, FAMILY_STYLE, FigureSkipped, display_names, method_colors,
                                    ordered)

logger = logging.getLogger(__name__)

FPR_GRID = np.linspace(0.0, 1.0, 101)



def encode(df: pd.DataFrame, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, labels as class indices, probabilities cases × classes) of a predictions table."""
    prob_cols = {c[len("prob_"):]: c for c in df.columns if c.startswith("prob_")}
    if "label" not in df.columns or len(prob_cols) < 2:
        raise FigureSkipped(f"{name}: predictions need label and ≥ 2 prob_<class> columns for a ROC; "
                            f"got {list(df.columns)}")
    classes = class_order(prob_cols)
    index = {c: i for i, c in enumerate(classes)}
    numeric = {}
    for c in classes:  # tolerate 1 vs "1" vs 1.0 from dtype guessing
        try:
            numeric[float(c)] = c
        except ValueError:
            pass
    y = []
    for case, lab in zip(df["case_id"], df["label"].astype(str)):
        if lab not in index:
            try:
                lab = numeric[float(lab)]
            except (ValueError, KeyError):
                raise ValueError(f"{name}: case {case} has label {lab!r}, not one of the prob_ classes "
                                 f"{classes}") from None
        y.append(index[lab])
    prob = df[[prob_cols[c] for c in classes]].to_numpy(float)
    return classes, np.asarray(y, int), prob


def _tpr_on_grid(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    fpr, tpr, _ = roc_curve(positive, score)
    out = np.interp(FPR_GRID, fpr, tpr)
    out[0] = 0.0
    return out


def _usable(y: np.ndarray, n_classes: int) -> list[int]:
    """Classes with at least one positive and one negative case."""
    return [c for c in range(n_classes) if 0 < (y == c).sum() < len(y)]


def macro_roc(y: np.ndarray, prob: np.ndarray, classes: list[int] | None = None) -> tuple[np.ndarray, float]:
    """(TPR on FPR_GRID, AUC): binary for two classes, else macro one-vs-rest over ``classes``."""
    n_classes = prob.shape[1]
    if n_classes == 2:
        positive = y == 1
        return _tpr_on_grid(positive, prob[:, 1]), float(roc_auc_score(positive, prob[:, 1]))
    classes = _usable(y, n_classes) if classes is None else classes
    tprs = [_tpr_on_grid(y == c, prob[:, c]) for c in classes]
    aucs = [roc_auc_score(y == c, prob[:, c]) for c in classes]
    return np.mean(tprs, axis=0), float(np.mean(aucs))


def roc_band(y: np.ndarray, prob: np.ndarray, n_boot: int, seed: int,
             alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, tuple[float, float]]:
    """Point curve, lower / upper percentile band, AUC and its bootstrap percentile interval."""
    classes = _usable(y, prob.shape[1])
    tpr, auc = macro_roc(y, prob, classes)
    rng = np.random.default_rng(seed)
    curves, aucs = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(_usable(y[idx], prob.shape[1])) < len(classes):
            continue  # a resample without a positive or a negative has no curve
        t, a = macro_roc(y[idx], prob[idx], classes)
        curves.append(t)
        aucs.append(a)
    if not curves:
        return tpr, tpr, tpr, auc, (np.nan, np.nan)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    lo, hi = np.percentile(curves, q, axis=0)
    a_lo, a_hi = np.percentile(aucs, q)
    return tpr, lo, hi, auc, (float(a_lo), float(a_hi))


def plot_roc(methods: dict[tuple[str, str], dict[int, pd.DataFrame]], n_boot: int = 200, seed: int = 0,
             auc_ci: dict[str, tuple[float, float]] | None = None, title: str = "") -> Figure:
    """One curve per method (test folds pooled) with its band; AUC [95 % CI] in the legend.

    ``auc_ci`` (display name → interval, from the metrics table) replaces the band's own interval,
    so the legend agrees with the tables.
    """
    names = display_names(list(methods))
    colors = method_colors(list(methods))
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for key in ordered(methods):
        name = names[key]
        pooled = pd.concat([methods[key][k] for k in sorted(methods[key])], ignore_index=True)
        classes, y, prob = encode(pooled, name)
        usable = _usable(y, len(classes))
        if len(usable) < (2 if len(classes) == 2 else 1):
            logger.warning("ROC: %s — the test folds hold a single class (%s); no ROC curve",
                           name, ", ".join(sorted({classes[i] for i in y})))
            continue
        if len(classes) > 2 and len(usable) < len(classes):
            left_out = [c for i, c in enumerate(classes) if i not in usable]
            logger.warning("ROC: %s — classes %s have no positive or no negative test case; macro "
                           "average over the others", name, left_out)
        tpr, lo, hi, auc, ci = roc_band(y, prob, n_boot, seed)
        ci = (auc_ci or {}).get(name, ci)
        label = f"{name} ({FAMILY_LABEL.get(key[0], key[0])}) AUC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        ax.fill_between(FPR_GRID, lo, hi, color=colors[key], alpha=0.15, linewidth=0)
        ax.plot(FPR_GRID, tpr, FAMILY_STYLE.get(key[0], "-"), color=colors[key], lw=1.8, label=label)
        drawn += 1
    if not drawn:
        raise FigureSkipped("every method's test folds hold a single class; a ROC needs both")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title=title or "ROC (test folds pooled)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    return fig
