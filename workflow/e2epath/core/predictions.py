"""The predictions table (docs/contracts.md `predictions.tsv`): one row per slide or per case, with
``label`` and ``prob_<class>`` columns (classification, grading) or ``time``, ``event`` and ``risk``
(survival). Training writes it (test and validation predictions), evaluation, figures and deployment
read it. `prepare` validates and encodes a table for the metrics (`e2epath.core.metrics`); errors
name the slide or case and the column.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from e2epath.core.metrics import (
    check_task_type,
    encode,
    ones,
    point,
    weighted_accuracy,
    weighted_auc_ovr,
    weighted_balanced_accuracy,
    weighted_c_index,
    weighted_macro_f1,
    weighted_qwk,
)
from e2epath.core.vocabulary import METRICS


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
        return {name: point(v, name) for name, v in self.weighted(ones(self.n)).items()}


def prepare(task_type: str, df: pd.DataFrame, strata: str | None = None) -> Cases:
    """Validate a predictions table and encode it; errors name the slide or case and the column.
    Rows are slides when the table has a `slide_id` column, else cases (`unit_of`).
    ``strata``: a column (the test fold of pooled folds) within which AUC and C-index compare cases."""
    check_task_type(task_type)
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
    y = encode(_label_names(df["label"], classes, case_id, unit), np.array(classes, dtype=object))
    return Cases(task_type, case_id, tuple(classes), y=y, prob=prob, strata=codes, unit=unit)


def task_metrics(task_type: str, df: pd.DataFrame) -> dict[str, float]:
    """All metrics of a task on a predictions DataFrame (docs/contracts.md format).

    classification: auc, accuracy, balanced_accuracy, macro_f1; grading: the same plus qwk (grade
    distances from the full ordered class list); survival: c_index. Undefined → NaN + warning.
    """
    return prepare(task_type, df).point()
