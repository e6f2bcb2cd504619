"""Task metrics — the one implementation shared by training (model selection on validation) and
evaluation (bootstrapped test metrics); predictions tables are read for them by `predictions`.

Every metric is a function of per-case multiplicities ``W`` (resamples × cases): the point
estimate is ``W = 1`` and a bootstrap resample is the number of times each case was drawn, so the
bootstrap (`evaluate.bootstrap`) runs the very code that gives the point estimate, on all resamples at
once. Point estimates equal scikit-learn (`roc_auc_score`, `accuracy_score`,
`balanced_accuracy_score`, `f1_score(average='macro')`, `cohen_kappa_score(weights='quadratic')`)
and lifelines (`concordance_index(time, -risk, event)`), ties included.

An undefined metric (a single class, no comparable pairs) is NaN with a logged warning, never an
exception: a tiny test fold must not stop a run.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from e2epath.core.vocabulary import MAIN_METRIC, TASK_TYPES

logger = logging.getLogger(__name__)

_UNDEFINED_WHY = {
    "auc": "needs a positive and a negative case for every class (pooled folds: within one test fold)",
    "accuracy": "no cases",
    "balanced_accuracy": "no cases",
    "macro_f1": "no cases",
    "qwk": "labels and predictions hold a single class",
    "c_index": "no comparable pairs (no events, or all event times tied; pooled folds: within one fold)",
}
_BLOCK_ELEMS = 1 << 21  # bound on the pairs held at once by the C-index (× resamples in a matmul)


def main_metric(task_type: str) -> str:
    """The metric used for model selection and as the headline number of a task type."""
    check_task_type(task_type)
    return MAIN_METRIC[task_type]


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")


# --------------------------------------------------------------------------------------------
# Weighted kernels: W is (B, n) float multiplicities, each returns (B,) with NaN where undefined.
# --------------------------------------------------------------------------------------------

def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    n = (~np.isnan(x)).sum(axis=1)
    return _safe_div(np.nansum(x, axis=1), n.astype(float))


def _auc_counts(positive: np.ndarray, score: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,) weighted ordered-pair counts: Σ w_pos·w_neg over (positive, negative) pairs with the
    positive scored higher (ties 1/2), and Σ w_pos·w_neg over all such pairs."""
    if positive.size == 0:
        return np.zeros(W.shape[0]), np.zeros(W.shape[0])
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    Wo = W[:, order]
    pos = positive[order]
    pos_w = np.add.reduceat(Wo * pos, starts, axis=1)
    neg_w = np.add.reduceat(Wo * ~pos, starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w  # negative weight strictly below each score group
    num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    return num, pos_w.sum(axis=1) * neg_w.sum(axis=1)


def weighted_auc(positive: np.ndarray, score: np.ndarray, W: np.ndarray,
                 strata: np.ndarray | None = None) -> np.ndarray:
    """Binary ROC AUC as a weighted Mann–Whitney statistic (score ties count 1/2). With ``strata``
    only (positive, negative) pairs within a stratum count: pooled test folds are scored by
    different models, whose scores need not share a scale."""
    if positive.size == 0:
        return np.full(W.shape[0], np.nan)
    if strata is None:
        return _safe_div(*_auc_counts(positive, score, W))
    num, den = np.zeros(W.shape[0]), np.zeros(W.shape[0])
    for s in np.unique(strata):
        cols = strata == s
        n, d = _auc_counts(positive[cols], score[cols], W[:, cols])
        num += n
        den += d
    return _safe_div(num, den)


def weighted_auc_ovr(y: np.ndarray, prob: np.ndarray, W: np.ndarray,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """AUC: binary (K = 2, score = prob of class 1) or macro one-vs-rest (K > 2).

    Undefined (NaN) as soon as one class lacks positives or negatives, as scikit-learn raises.
    """
    k = prob.shape[1]
    if k == 2:
        return weighted_auc(y == 1, prob[:, 1], W, strata)
    per_class = np.stack([weighted_auc(y == c, prob[:, c], W, strata) for c in range(k)], axis=1)
    return per_class.mean(axis=1)  # NaN propagates: macro AUC needs every class


def _onehot(codes: np.ndarray, k: int) -> np.ndarray:
    return (codes[:, None] == np.arange(k)[None, :]).astype(float)


def weighted_accuracy(y: np.ndarray, pred: np.ndarray, W: np.ndarray) -> np.ndarray:
    return _safe_div(W @ (y == pred).astype(float), W.sum(axis=1))


def weighted_balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int, W: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in y (scikit-learn ignores absent ones)."""
    Y = _onehot(y, k)
    return _nanmean_rows(_safe_div(W @ (Y * (y == pred)[:, None]), W @ Y))


def weighted_macro_f1(y: np.ndarray, pred: np.ndarray, k: int, W: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in y or pred: F1 = 2 TP / (|y = c| + |pred = c|)."""
    Y, P = _onehot(y, k), _onehot(pred, k)
    return _nanmean_rows(_safe_div(2.0 * (W @ (Y * P)), W @ Y + W @ P))


def weighted_qwk(y: np.ndarray, pred: np.ndarray, k: int, W: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights (i − j)² on the class positions 0..k−1."""
    conf = (W @ _onehot(y * k + pred, k * k)).reshape(-1, k, k)
    total = conf.sum(axis=(1, 2))
    expected = conf.sum(axis=2)[:, :, None] * conf.sum(axis=1)[:, None, :]
    expected = _safe_div(expected, total[:, None, None])
    i = np.arange(k)
    wt = (i[:, None] - i[None, :]) ** 2.0
    return 1.0 - _safe_div((wt * conf).sum(axis=(1, 2)), (wt * expected).sum(axis=(1, 2)))


def weighted_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, W: np.ndarray,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """Harrell's C with lifelines' tie rules, weighted by multiplicity products w_i·w_j.

    A pair (i, j) is comparable when i has an event and t_i < t_j, or t_i = t_j and j is censored;
    it is concordant when risk_i > risk_j and counts 1/2 when the risks tie. With ``strata`` only
    pairs within a stratum count (R survival's ``concordance(... + strata())``): pooled test folds
    are ranked by different models whose risk scores share no scale. The event rows are processed
    in blocks so that n = 10⁴ never holds 10⁸ pairs at once.
    """
    ev = np.flatnonzero(event)
    num = np.zeros(W.shape[0])
    den = np.zeros(W.shape[0])
    block = max(1, _BLOCK_ELEMS // max(1, time.size))
    for start in range(0, ev.size, block):
        i = ev[start:start + block]
        ti, ri = time[i][:, None], risk[i][:, None]
        comparable = (time[None, :] > ti) | ((time[None, :] == ti) & (event[None, :] == 0))
        if strata is not None:
            comparable &= strata[None, :] == strata[i][:, None]
        score = (ri > risk[None, :]) + 0.5 * (ri == risk[None, :])
        pairs = np.concatenate([comparable, comparable * score], axis=0).astype(float)
        Wj = W @ pairs.T  # (B, 2·block): comparable / concordant weight partner-summed per i
        Wi = W[:, i]
        den += (Wi * Wj[:, :i.size]).sum(axis=1)
        num += (Wi * Wj[:, i.size:]).sum(axis=1)
    return _safe_div(num, den)


# --------------------------------------------------------------------------------------------
# Point estimates on plain arrays.
# --------------------------------------------------------------------------------------------

def point(values: np.ndarray, name: str) -> float:
    value = float(values[0])
    if np.isnan(value):
        logger.warning("%s is undefined here (%s): reporting NaN", name, _UNDEFINED_WHY[name])
    return value


def ones(n: int) -> np.ndarray:
    return np.ones((1, n))


def encode(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    index = {v: i for i, v in enumerate(labels.tolist())}
    unknown = [v for v in values.tolist() if v not in index]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one of the classes {labels.tolist()}")
    return np.array([index[v] for v in values.tolist()], dtype=np.int64)


def _codes(y, pred, labels) -> tuple[np.ndarray, np.ndarray, int]:
    y, pred = np.asarray(y), np.asarray(pred)
    labels = np.unique(np.concatenate([y, pred])) if labels is None else np.asarray(labels)
    return encode(y, labels), encode(pred, labels), len(labels)


def auc(y, prob, labels=None) -> float:
    """ROC AUC. ``prob`` 1-D: probability of the larger of two labels; 2-D (n, K): one column per
    label in ``labels`` order (default: sorted unique y), binary for K = 2, else macro one-vs-rest."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=float)
    if prob.ndim == 1:
        classes = np.unique(y) if labels is None else np.asarray(labels)
        if len(classes) > 2:
            raise ValueError(f"1-D prob needs a binary y; got classes {classes.tolist()}: "
                             "pass an (n, K) probability matrix")
        positive = y == classes[-1] if len(classes) == 2 else np.zeros(y.shape, bool)
        return point(weighted_auc(positive, prob, ones(y.size)), "auc")
    classes = np.unique(y) if labels is None else np.asarray(labels)
    if len(classes) != prob.shape[1]:
        raise ValueError(f"prob has {prob.shape[1]} columns but there are {len(classes)} classes "
                         f"{classes.tolist()}: pass labels= in column order")
    return point(weighted_auc_ovr(encode(y, classes), prob, ones(y.size)), "auc")


def accuracy(y, pred) -> float:
    yc, pc, _ = _codes(y, pred, None)
    return point(weighted_accuracy(yc, pc, ones(yc.size)), "accuracy")


def balanced_accuracy(y, pred) -> float:
    yc, pc, k = _codes(y, pred, None)
    return point(weighted_balanced_accuracy(yc, pc, k, ones(yc.size)), "balanced_accuracy")


def macro_f1(y, pred) -> float:
    yc, pc, k = _codes(y, pred, None)
    return point(weighted_macro_f1(yc, pc, k, ones(yc.size)), "macro_f1")


def qwk(y, pred, labels=None) -> float:
    """Quadratic weighted kappa; weights use positions in ``labels`` (default: sorted union of y
    and pred, as scikit-learn). Pass the full ordered grade list to keep distances fixed."""
    yc, pc, k = _codes(y, pred, labels)
    return point(weighted_qwk(yc, pc, k, ones(yc.size)), "qwk")


def c_index(time, event, risk, strata=None) -> float:
    """Harrell's C; higher risk = earlier event; equals lifelines concordance_index(time, -risk, event).
    With ``strata`` (e.g. the test fold of each case) only pairs within a stratum are compared."""
    time, risk = np.asarray(time, dtype=float), np.asarray(risk, dtype=float)
    event = np.asarray(event).astype(bool)
    codes = None if strata is None else pd.factorize(np.asarray(strata))[0]
    return point(weighted_c_index(time, event, risk, ones(time.size), codes), "c_index")
