"""Task metrics — the one implementation shared by training (model selection on validation) and
evaluation (bootstrapped test metrics), and the one reading of predictions tables and class labels.

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
from dataclasses import dataclass

import numpy as np
import pandas as pd

from e2epath.core.vocabulary import MAIN_METRIC, METRICS, TASK_TYPES

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
    _check_task_type(task_type)
    return MAIN_METRIC[task_type]


def _check_task_type(task_type: str) -> None:
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

def _point(values: np.ndarray, name: str) -> float:
    value = float(values[0])
    if np.isnan(value):
        logger.warning("%s is undefined here (%s): reporting NaN", name, _UNDEFINED_WHY[name])
    return value


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


def _encode(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    index = {v: i for i, v in enumerate(labels.tolist())}
    unknown = [v for v in values.tolist() if v not in index]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one of the classes {labels.tolist()}")
    return np.array([index[v] for v in values.tolist()], dtype=np.int64)


def _codes(y, pred, labels) -> tuple[np.ndarray, np.ndarray, int]:
    y, pred = np.asarray(y), np.asarray(pred)
    labels = np.unique(np.concatenate([y, pred])) if labels is None else np.asarray(labels)
    return _encode(y, labels), _encode(pred, labels), len(labels)


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
        return _point(weighted_auc(positive, prob, _ones(y.size)), "auc")
    classes = np.unique(y) if labels is None else np.asarray(labels)
    if len(classes) != prob.shape[1]:
        raise ValueError(f"prob has {prob.shape[1]} columns but there are {len(classes)} classes "
                         f"{classes.tolist()}: pass labels= in column order")
    return _point(weighted_auc_ovr(_encode(y, classes), prob, _ones(y.size)), "auc")


def accuracy(y, pred) -> float:
    yc, pc, _ = _codes(y, pred, None)
    return _point(weighted_accuracy(yc, pc, _ones(yc.size)), "accuracy")


def balanced_accuracy(y, pred) -> float:
    yc, pc, k = _codes(y, pred, None)
    return _point(weighted_balanced_accuracy(yc, pc, k, _ones(yc.size)), "balanced_accuracy")


def macro_f1(y, pred) -> float:
    yc, pc, k = _codes(y, pred, None)
    return _point(weighted_macro_f1(yc, pc, k, _ones(yc.size)), "macro_f1")


def qwk(y, pred, labels=None) -> float:
    """Quadratic weighted kappa; weights use positions in ``labels`` (default: sorted union of y
    and pred, as scikit-learn). Pass the full ordered grade list to keep distances fixed."""
    yc, pc, k = _codes(y, pred, labels)
    return _point(weighted_qwk(yc, pc, k, _ones(yc.size)), "qwk")


def c_index(time, event, risk, strata=None) -> float:
    """Harrell's C; higher risk = earlier event; equals lifelines concordance_index(time, -risk, event).
    With ``strata`` (e.g. the test fold of each case) only pairs within a stratum are compared."""
    time, risk = np.asarray(time, dtype=float), np.asarray(risk, dtype=float)
    event = np.asarray(event).astype(bool)
    codes = None if strata is None else pd.factorize(np.asarray(strata))[0]
    return _point(weighted_c_index(time, event, risk, _ones(time.size), codes), "c_index")


# --------------------------------------------------------------------------------------------
# Prediction tables (docs/contracts.md `predictions.tsv`).
# --------------------------------------------------------------------------------------------

def class_order(names) -> list[str]:
    """Numeric order when every class name is a number (grades 2 < 10), else string order."""
    names = [str(n) for n in names]
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _label_names(labels: pd.Series, classes: list[str], case_ids: np.ndarray, unit: str = "case") -> np.ndarray:
    """Map the label column to class names; tolerate 1 vs "1" vs 1.0 from dtype guessing."""
    known = set(classes)
    numeric = {}
    for c in classes:
        try:
            numeric[float(c)] = c
        except ValueError:
            pass
    out = []
    for case, value in zip(case_ids, labels.tolist()):
        name = str(value)
        if name not in known:
            try:
                name = numeric[float(value)]
            except (ValueError, TypeError, KeyError):
                raise ValueError(f"{unit} {case}: label {value!r} has no prob_<class> column "
                                 f"(classes {classes}); check the label table and the predictions") from None
        out.append(name)
    return np.array(out, dtype=object)


def _finite(df: pd.DataFrame, cols: list[str], ids: np.ndarray, unit: str) -> np.ndarray:
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{unit} {ids[r]}: {cols[c]} = {df[cols[c]].iloc[r]!r} is not a finite "
                         "number; fix the predictions file")
    return values


def unit_of(df: pd.DataFrame) -> str:
    """What a predictions table's rows are: slides (it has a `slide_id` column) or cases."""
    return "slide" if "slide_id" in df.columns else "case"


def case_level(task_type: str, df: pd.DataFrame) -> pd.DataFrame:
    """Slide predictions → one row per case: the mean of its slides' probabilities (classes) or
    risks (survival); label, time, event and any `fold` column are the case's. Case rows pass."""
    if unit_of(df) == "case":
        return df
    df = df.assign(case_id=df["case_id"].astype(str))
    scores = [c for c in df.columns if c.startswith("prob_")] if task_type != "survival" else ["risk"]
    keep = [c for c in ("label", "time", "event", "fold") if c in df.columns]
    grouped = df.groupby("case_id", sort=True)
    out = grouped[scores].mean()
    for col in keep:
        if (grouped[col].nunique(dropna=False) > 1).any():
            case = grouped[col].nunique(dropna=False).idxmax()
            raise ValueError(f"case {case}: its slides disagree on {col}; a case has one {col}")
        out[col] = grouped[col].first()
    return out.reset_index()[["case_id", *keep, *scores]]


@dataclass(frozen=True)
class Cases:
    """One prediction table — one row per slide or per case (``unit``) — validated, encoded and
    sorted by id (so that every method on the same units sees the same bootstrap resamples)."""

    task_type: str
    ids: np.ndarray
    classes: tuple[str, ...] = ()
    y: np.ndarray | None = None      # class codes (n,)
    prob: np.ndarray | None = None   # (n, K), columns in `classes` order
    time: np.ndarray | None = None
    event: np.ndarray | None = None  # bool
    risk: np.ndarray | None = None
    strata: np.ndarray | None = None  # AUC and C-index compare pairs only within a stratum (test fold)
    unit: str = "case"

    @property
    def n(self) -> int:
        return int(self.ids.size)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS[self.task_type]

    def weighted(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """All metrics of the task for each row of multiplicities W (B, n)."""
        if self.task_type == "survival":
            return {"c_index": weighted_c_index(self.time, self.event, self.risk, W, self.strata)}
        k = len(self.classes)
        pred = self.prob.argmax(axis=1)  # ties → first class in `classes` order
        out = {
            "auc": weighted_auc_ovr(self.y, self.prob, W, self.strata),
            "accuracy": weighted_accuracy(self.y, pred, W),
            "balanced_accuracy": weighted_balanced_accuracy(self.y, pred, k, W),
            "macro_f1": weighted_macro_f1(self.y, pred, k, W),
        }
        if self.task_type == "grading":
            out["qwk"] = weighted_qwk(self.y, pred, k, W)
        return out

    def point(self) -> dict[str, float]:
        return {name: _point(v, name) for name, v in self.weighted(_ones(self.n)).items()}


def prepare(task_type: str, df: pd.DataFrame, strata: str | None = None) -> Cases:
    """Validate a predictions table and encode it; errors name the slide or case and the column.
    Rows are slides when the table has a `slide_id` column, else cases (`unit_of`).
    ``strata``: a column (the test fold of pooled folds) within which AUC and C-index compare cases."""
    _check_task_type(task_type)
    if "case_id" not in df.columns:
        raise ValueError("predictions have no case_id column (see docs/contracts.md predictions.tsv)")
    unit = unit_of(df)
    key = f"{unit}_id"
    df = df.assign(**{key: df[key].astype(str)}).sort_values(key, kind="stable")
    case_id = df[key].to_numpy()
    dup = df[key][df[key].duplicated()]
    if len(dup):
        raise ValueError(f"{unit} {dup.iloc[0]} appears more than once in the predictions; "
                         f"each {unit} must be a test {unit} once (one row per {unit})")
    codes = None if strata is None else pd.factorize(df[strata])[0]
    if task_type == "survival":
        missing = [c for c in ("time", "event", "risk") if c not in df.columns]
        if missing:
            raise ValueError(f"survival predictions lack column(s) {missing}; need case_id, time, event, risk")
        values = _finite(df, ["time", "event", "risk"], case_id, unit)
        bad = ~np.isin(values[:, 1], (0.0, 1.0))
        if bad.any():
            raise ValueError(f"{unit} {case_id[np.argmax(bad)]}: event must be 0 or 1")
        return Cases(task_type, case_id, time=values[:, 0], event=values[:, 1].astype(bool), risk=values[:, 2],
                     strata=codes, unit=unit)
    prob_cols = {c[len("prob_"):]: c for c in df.columns if c.startswith("prob_")}
    if "label" not in df.columns or len(prob_cols) < 2:
        raise ValueError(f"{task_type} predictions need a label column and prob_<class> columns for "
                         f"at least two classes; got columns {list(df.columns)}")
    classes = class_order(prob_cols)
    prob = _finite(df, [prob_cols[c] for c in classes], case_id, unit)
    y = _encode(_label_names(df["label"], classes, case_id, unit), np.array(classes, dtype=object))
    return Cases(task_type, case_id, tuple(classes), y=y, prob=prob, strata=codes, unit=unit)


def task_metrics(task_type: str, df: pd.DataFrame) -> dict[str, float]:
    """All metrics of a task on a predictions DataFrame (docs/contracts.md format).

    classification: auc, accuracy, balanced_accuracy, macro_f1; grading: the same plus qwk (grade
    distances from the full ordered class list); survival: c_index. Undefined → NaN + warning.
    """
    return prepare(task_type, df).point()
