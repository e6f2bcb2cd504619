"""ROC curves per method over the test folds, with a bootstrap band.

Each fold's cases are scored by that fold's model, and scores of different models share no scale,
so — as the evaluation's pooled AUC — a curve compares cases of one fold only: the folds' ROC
curves (TPR on a common FPR grid) averaged with weights positives × negatives, whose AUC is the
pair-weighted mean of the fold AUCs (`metrics.weighted_auc` with strata). Binary tasks use the
probability of the second class (classes in numeric order when every name is a number, else string
order — as the evaluation does); more than two classes give the macro average of the one-vs-rest
curves, whose AUC is the mean of the per-class AUCs (one fold: scikit-learn
``roc_auc_score(multi_class="ovr", average="macro")``). The band is the 2.5–97.5 % percentile of
the TPR at each grid FPR over case-level bootstrap resamples drawn within folds.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from e2epath.core.metrics import weighted_auc
from e2epath.core.predictions import prepare
from e2epath.core.vocabulary import FAMILY_LABELS
from e2epath.evaluate.bootstrap import resample_indices
from e2epath.figures.common import FAMILY_STYLE, FigureSkipped, method_colors, ordered

logger = logging.getLogger(__name__)

FPR_GRID = np.linspace(0.0, 1.0, 101)


def encode(df: pd.DataFrame, task_type: str, name: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(classes, labels as class indices, probabilities cases × classes, test fold of each case) of
    pooled predictions with a ``fold`` column, read as the evaluation reads them (`predictions.prepare`)."""
    try:
        cases = prepare(task_type, df, strata="fold")
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    return cases.classes, cases.y, cases.prob, cases.strata


def _tpr_on_grid(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    fpr, tpr, _ = roc_curve(positive, score)
    out = np.interp(FPR_GRID, fpr, tpr)
    out[0] = 0.0
    return out


def _pairs(positive: np.ndarray, fold: np.ndarray) -> dict[int, int]:
    """Positive × negative pair count of each fold that has both."""
    out = {}
    for f in np.unique(fold):
        n_pos = int(positive[fold == f].sum())
        n_neg = int((fold == f).sum()) - n_pos
        if n_pos and n_neg:
            out[int(f)] = n_pos * n_neg
    return out


def _usable(y: np.ndarray, n_classes: int, fold: np.ndarray | None = None) -> list[int]:
    """Classes with a positive and a negative case in one fold (binary: the second class only)."""
    fold = np.zeros(len(y), int) if fold is None else fold
    classes = [1] if n_classes == 2 else range(n_classes)
    return [c for c in classes if _pairs(y == c, fold)]


def _fold_roc(positive: np.ndarray, score: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, float]:
    """The folds' curves averaged, weighted by pairs, and the evaluation's within-fold AUC."""
    pairs = _pairs(positive, fold)
    curves = [_tpr_on_grid(positive[fold == f], score[fold == f]) for f in pairs]
    auc = weighted_auc(positive, score, np.ones((1, len(score))), fold)[0]
    return np.average(curves, axis=0, weights=list(pairs.values())), float(auc)


def macro_roc(y: np.ndarray, prob: np.ndarray, classes: list[int] | None = None,
              fold: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(TPR on FPR_GRID, AUC): binary for two classes, else macro one-vs-rest over ``classes``;
    with ``fold``, cases are compared within their fold only."""
    fold = np.zeros(len(y), int) if fold is None else np.asarray(fold)
    classes = _usable(y, prob.shape[1], fold) if classes is None else classes
    per_class = [_fold_roc(y == c, prob[:, c], fold) for c in classes]
    return np.mean([t for t, _ in per_class], axis=0), float(np.mean([a for _, a in per_class]))


def roc_band(y: np.ndarray, prob: np.ndarray, n_boot: int, seed: int, alpha: float,
             fold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, tuple[float, float]]:
    """Point curve, lower / upper percentile band, AUC and its bootstrap percentile interval."""
    fold = np.zeros(len(y), int) if fold is None else np.asarray(fold)
    classes = _usable(y, prob.shape[1], fold)
    tpr, auc = macro_roc(y, prob, classes, fold)
    curves, aucs = [], []
    for idx in resample_indices(len(y), n_boot, seed, fold):  # within folds, as the metrics table
        if len(_usable(y[idx], prob.shape[1], fold[idx])) < len(classes):
            continue  # a resample without a positive or a negative has no curve
        t, a = macro_roc(y[idx], prob[idx], classes, fold[idx])
        curves.append(t)
        aucs.append(a)
    if not curves:
        return tpr, tpr, tpr, auc, (np.nan, np.nan)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    lo, hi = np.percentile(curves, q, axis=0)
    a_lo, a_hi = np.percentile(aucs, q)
    return tpr, lo, hi, auc, (float(a_lo), float(a_hi))


def plot_roc(methods: dict[tuple[str, str], dict[int, pd.DataFrame]], task_type: str, n_boot: int, seed: int,
             alpha: float, auc_ci: dict[str, tuple[float, float]] | None = None, title: str = "") -> Figure:
    """One curve per method (the test folds' curves averaged) with its band; AUC [1 − alpha CI] in the
    legend.

    ``auc_ci`` (method → interval, from the metrics table) replaces the band's own interval,
    so the legend agrees with the tables.
    """
    colors = method_colors(list(methods))
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for key in ordered(methods):
        name = key[1]
        folds = methods[key]
        pooled = pd.concat([folds[k].assign(fold=k) for k in sorted(folds)], ignore_index=True)
        classes, y, prob, fold = encode(pooled, task_type, name)
        usable = _usable(y, len(classes), fold)
        if not usable:
            logger.warning("ROC: %s — no test fold holds both a positive and a negative case (%s); "
                           "no ROC curve", name, ", ".join(sorted({classes[i] for i in y})))
            continue
        if len(classes) > 2 and len(usable) < len(classes):
            left_out = [c for i, c in enumerate(classes) if i not in usable]
            logger.warning("ROC: %s — classes %s have no test fold with a positive and a negative "
                           "case; macro average over the others", name, left_out)
        tpr, lo, hi, auc, ci = roc_band(y, prob, n_boot, seed, alpha, fold=fold)
        ci = (auc_ci or {}).get(name, ci)
        label = f"{name} ({FAMILY_LABELS[key[0]]}) AUC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        ax.fill_between(FPR_GRID, lo, hi, color=colors[key], alpha=0.15, linewidth=0)
        ax.plot(FPR_GRID, tpr, FAMILY_STYLE.get(key[0], "-"), color=colors[key], lw=1.8, label=label)
        drawn += 1
    if not drawn:
        raise FigureSkipped("every method's test folds hold a single class; a ROC needs both")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title=title or "ROC (mean of the test folds)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    return fig
