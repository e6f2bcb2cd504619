"""What every figure family shares: method order and colours, and saving a figure as PNG + PDF.

Figures read only the files of docs/contracts.md; training runs are read through
`e2epath.layout` (each run's run.json says its family, method and fold).
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from e2epath.core.vocabulary import FAMILIES  # noqa: E402

logger = logging.getLogger(__name__)

FAMILY_STYLE = {"e2e": "-", "twostage": "--"}
PNG_DPI = 150


class FigureSkipped(Exception):
    """A figure whose inputs are missing or insufficient; the message says why (logged, no crash)."""


def ordered(keys) -> list[tuple[str, str]]:
    """E2E methods first, then two-stage, each by name: the same order in every figure."""
    return sorted(set(keys), key=lambda k: (FAMILIES.index(k[0]), k[1]))


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
