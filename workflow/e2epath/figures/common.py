"""What every figure family shares: reading the training outputs by path, method names and
colours, and saving a figure as PNG + PDF.

Figures read only the files of CONTRACTS.md; family, method and fold come from the path
``results/{family}/{task}/{method}/fold{k}/<file>``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

logger = logging.getLogger(__name__)

FAMILIES = ("e2e", "twostage")
FAMILY_LABEL = {"e2e": "E2E", "twostage": "two-stage"}
FAMILY_STYLE = {"e2e": "-", "twostage": "--"}
PNG_DPI = 150
_FOLD_RE = re.compile(r"fold(\d+)$")


class FigureSkipped(Exception):
    """A figure whose inputs are missing or insufficient; the message says why (logged, no crash)."""


@dataclass(frozen=True)
class RunFile:
    """One per-fold training output file and where it sits in the results tree."""
    path: Path
    family: str
    task: str
    method: str
    fold: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.family, self.method)


def parse_run_path(path: str | Path) -> RunFile:
    """results/{family}/{task}/{method}/fold{k}/<file> → its parts; a clear error otherwise."""
    p = Path(path)
    parts = p.parts
    m = _FOLD_RE.match(parts[-2]) if len(parts) >= 5 else None
    if m is None or parts[-5] not in FAMILIES:
        raise ValueError(f"{path}: expected results/{{e2e|twostage}}/{{task}}/{{method}}/fold{{k}}/{p.name}")
    return RunFile(p, parts[-5], parts[-4], parts[-3], int(m.group(1)))


def existing_runs(paths: list[str | Path], what: str) -> list[RunFile]:
    """Parse ``paths``; files that do not exist are logged and left out."""
    runs = [parse_run_path(p) for p in paths]
    missing = [r for r in runs if not r.path.is_file()]
    for r in missing:
        logger.warning("%s file %s does not exist — left out", what, r.path)
    return [r for r in runs if r.path.is_file()]


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV with ids and labels kept as text; a 0-byte file reads as no rows."""
    try:
        return pd.read_csv(path, sep="\t", dtype={"case_id": str, "label": str, "slide_id": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_by_method(runs: list[RunFile]) -> dict[tuple[str, str], dict[int, pd.DataFrame]]:
    """{(family, method): {fold: table}}, empty tables left out (with a log line)."""
    out: dict[tuple[str, str], dict[int, pd.DataFrame]] = {}
    for r in runs:
        df = read_tsv(r.path)
        if df.empty:
            logger.warning("%s: no rows — left out", r.path)
            continue
        folds = out.setdefault(r.key, {})
        if r.fold in folds:
            raise ValueError(f"{r.path}: fold {r.fold} of {r.family}/{r.method} given twice")
        folds[r.fold] = df
    return out


def display_names(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """`method`, or `family/method` where a method name exists in both families (as in the
    metrics table)."""
    count: dict[str, int] = {}
    for _, method in keys:
        count[method] = count.get(method, 0) + 1
    return {(f, m): (m if count[m] == 1 else f"{f}/{m}") for f, m in keys}


def ordered(keys) -> list[tuple[str, str]]:
    """E2E methods first, then two-stage, each by name: the same order in every figure."""
    return sorted(set(keys), key=lambda k: (FAMILIES.index(k[0]) if k[0] in FAMILIES else 9, k[1]))


def method_colors(keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
    """One tab10/tab20 colour per method, stable for a given set of methods."""
    keys = ordered(keys)
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` (fixed figure size, so the aspect is the layout's)."""
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=PNG_DPI)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
