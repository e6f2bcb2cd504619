"""Sample sheet and label tables: load, validate, resolve relative paths.

Every problem is reported at once, each line naming the file, the row and what to do, so a
user fixes their sheet in one pass instead of one error per run.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from e2epath.core.vocabulary import ID_RE, ID_RULE

logger = logging.getLogger(__name__)

# A sample sheet (TSV): one row per slide; `mpp` (µm per pixel) is optional, for slides that do not say.
SHEET_COLUMNS = ("slide_id", "path", "case_id", "mpp")
SHEET_REQUIRED = SHEET_COLUMNS[:3]
SHEET_HELP = "slide_id, path, case_id[, mpp]"


def label_columns(task_type: str) -> tuple[str, ...]:
    """The columns of a task's label table (CSV): one row per case."""
    return ("case_id", "time", "event") if task_type == "survival" else ("case_id", "label")


class SheetError(ValueError):
    """One or more problems in the sample sheet or a label table."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(["invalid input:"] + [f"  - {p}" for p in problems]))


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    if not path.is_file():
        raise SheetError([f"{path}: file not found; check the path in config.yaml "
                          "(relative paths are relative to the run directory)"])
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])


def _check_ids(df: pd.DataFrame, col: str, where: str, problems: list[str], unique: bool) -> None:
    for i, value in df[col].items():
        row = f"{where} row {i + 2}"  # +2: header line and 1-based numbering
        if pd.isna(value):
            problems.append(f"{row}: empty {col}")
        elif not ID_RE.match(value):
            problems.append(f"{row}: {col} {value!r} may only contain {ID_RULE}; rename it")
    if unique:
        for value in df[col][df[col].duplicated()].dropna().unique():
            rows = [str(i + 2) for i in df.index[df[col] == value]]
            problems.append(f"{where}: duplicate {col} {value!r} in rows {', '.join(rows)}; "
                            "ids must be unique")


def load_samples(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate ``slides.tsv``; ``path`` becomes absolute (relative to the sheet)."""
    path = Path(path)
    df = _read_table(path, "\t")
    where = str(path)
    missing = [c for c in SHEET_REQUIRED if c not in df.columns]
    if missing:
        raise SheetError([f"{where}: missing column(s) {', '.join(missing)}; a sample sheet is "
                          f"tab-separated with columns {SHEET_HELP}"])
    extra = sorted(set(df.columns) - set(SHEET_COLUMNS))
    problems: list[str] = [f"{where}: unknown column {c!r}; allowed: {', '.join(SHEET_COLUMNS)}" for c in extra]
    _check_ids(df, "slide_id", where, problems, unique=True)
    _check_ids(df, "case_id", where, problems, unique=False)
    df["path"] = [str((path.parent / p).resolve()) if isinstance(p, str) else p for p in df["path"]]
    if "mpp" not in df.columns:
        df["mpp"] = None
    for i, row in df.iterrows():
        if not isinstance(row["path"], str):
            problems.append(f"{where} row {i + 2}: empty path")
        elif check_files and not Path(row["path"]).is_file():
            problems.append(f"{where} row {i + 2}: slide file {row['path']} of {row['slide_id']!r} "
                            "does not exist; fix the path (relative to the sheet's folder) or drop the row")
        mpp = row["mpp"]
        if isinstance(mpp, str):
            try:
                ok = math.isfinite(float(mpp)) and float(mpp) > 0
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"{where} row {i + 2}: mpp {mpp!r} of {row['slide_id']!r} must be a "
                                "positive number of µm per pixel (or empty)")
    if problems:
        raise SheetError(problems)
    df["mpp"] = pd.to_numeric(df["mpp"])
    return df.reset_index(drop=True)


def load_labels(path: str | Path, task: str, task_type: str, cases: set[str] | None = None) -> pd.DataFrame:
    """Read and validate one task's label table against the cases of the sample sheet."""
    path = Path(path)
    df = _read_table(path, ",")
    where = f"{path} (task {task!r})"
    cols = list(label_columns(task_type))
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SheetError([f"{where}: missing column(s) {', '.join(missing)}; a {task_type} table "
                          f"has columns {','.join(cols)}"])
    problems: list[str] = []
    _check_ids(df, "case_id", where, problems, unique=True)
    for i, row in df.iterrows():
        r = f"{where} row {i + 2}"
        if task_type == "survival":
            _check_survival_row(row, r, problems)
        elif pd.isna(row["label"]):
            problems.append(f"{r}: empty label for case {row['case_id']!r}; fill it or drop the row")
        if cases is not None and isinstance(row["case_id"], str) and row["case_id"] not in cases:
            problems.append(f"{r}: case {row['case_id']!r} has no slide in the sample sheet; "
                            "add its slides or drop the row")
    if cases is not None:
        labelled = set(df["case_id"].dropna())
        for case in sorted(cases - labelled):
            problems.append(f"{where}: case {case!r} of the sample sheet has no label; add a row "
                            "(cases without labels are not silently dropped)")
    if problems:
        raise SheetError(problems)
    if task_type == "survival":
        df["time"] = df["time"].astype(float)
        df["event"] = df["event"].astype(float).astype(int)
    return df.reset_index(drop=True)


def _check_survival_row(row: pd.Series, r: str, problems: list[str]) -> None:
    try:
        time = float(row["time"])
    except (TypeError, ValueError):
        time = math.nan
    if not math.isfinite(time) or time < 0:
        problems.append(f"{r}: time {row['time']!r} of case {row['case_id']!r} must be a "
                        "non-negative number")
    if row["event"] not in ("0", "1", "0.0", "1.0"):
        problems.append(f"{r}: event {row['event']!r} of case {row['case_id']!r} must be 0 "
                        "(censored) or 1 (event)")


def validate_all(config: dict, check_files: bool = True) -> pd.DataFrame:
    """Validate the sample sheet and every task's label table; return the sheet."""
    samples = load_samples(config["samples"], check_files=check_files)
    cases = set(samples["case_id"])
    problems: list[str] = []
    for task, spec in config["tasks"].items():
        if not ID_RE.match(task):
            problems.append(f"config tasks: task name {task!r} may only contain {ID_RULE}")
            continue
        try:
            load_labels(spec["labels"], task, spec["type"], cases)
        except SheetError as err:
            problems += err.problems
    if problems:
        raise SheetError(problems)
    return samples


def validate_cohort(name: str, spec: dict, tasks: dict, check_files: bool = True) -> pd.DataFrame:
    """Validate an external cohort (config ``cohorts.<name>``): its sheet, and each label table it
    gives — for a task of the config, every labelled case with slides in the cohort's sheet. Cases
    without a label are predicted and not scored. Returns the sheet."""
    problems: list[str] = []
    if not ID_RE.match(name):
        problems.append(f"config cohorts: cohort name {name!r} may only contain {ID_RULE}")
    try:
        samples = load_samples(spec["samples"], check_files=check_files)
    except SheetError as err:
        raise SheetError([f"cohort {name!r}: {p}" for p in err.problems]) from err
    cases = set(samples["case_id"])
    for task, path in (spec.get("labels") or {}).items():
        if task not in tasks:
            problems.append(f"config cohorts.{name}.labels: {task!r} is not a task of the config "
                            f"({', '.join(tasks)}); a cohort's labels score the trained tasks only")
            continue
        try:
            labels = load_labels(path, task, tasks[task]["type"])
        except SheetError as err:
            problems += [f"cohort {name!r}: {p}" for p in err.problems]
            continue
        for i, case in labels["case_id"].items():
            if case not in cases:
                problems.append(f"{path} (cohort {name!r}, task {task!r}) row {i + 2}: case {case!r} has no "
                                f"slide in {spec['samples']}; add its slides or drop the row")
    if problems:
        raise SheetError(problems)
    return samples
