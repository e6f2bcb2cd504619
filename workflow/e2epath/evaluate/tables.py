"""Results tables (Markdown + LaTeX) from `results/metrics/{task}.tsv`, laid out like Tables 1–2
of the ABMILX paper (Tang et al., NeurIPS 2025, arXiv:2506.02408; docs/method.md): pooled results,
one row per method grouped two-stage then end-to-end, one column per metric, cells
``mean [ci_low, ci_high]`` of the bootstrap, ×100 with one decimal (the paper reports ×100). The
best mean of each column (at the shown precision) is bold; every metric is higher-is-better. With
labelled external cohorts, each cohort's metrics (the fold models' ensemble) follow the internal
ones side by side, as in the paper's Table 3.

`python -m e2epath tables --metrics results/metrics/T.tsv --md-out results/tables/T.md
--tex-out results/tables/T.tex [--decimals 1] [--caption TEXT]`
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pandas as pd

from e2epath.core.io import write_bytes
from e2epath.core.layout import read_encoders
from e2epath.core.vocabulary import INTERNAL, METRIC_LABELS
from e2epath.evaluate.evaluation import cohort_order, headline, primary_unit

logger = logging.getLogger(__name__)

GROUPS = (("twostage", "Two-stage"), ("e2e", "End-to-end"))
SCALE = 100.0
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "–": "--", "×": r"$\times$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def pooled_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Headline rows of the models' unit (slides or cases): internal pooled test folds, then each
    external cohort's ensemble → (family, method) × (cohort, metric) frame of (mean, ci_low,
    ci_high) tuples."""
    missing = ({"cohort", "method", "family", "unit", "fold", "metric", "mean", "ci_low", "ci_high"}
               - set(metrics.columns))
    if missing:
        raise ValueError(f"metrics table lacks column(s) {sorted(missing)}; produce it with `e2epath evaluate`")
    rows = headline(metrics)
    if rows[rows["cohort"] == INTERNAL].empty:
        raise ValueError("metrics table has no pooled rows; produce it with `e2epath evaluate`")
    order = [m for m in METRIC_LABELS if m in set(rows["metric"])]
    order += sorted(set(rows["metric"]) - set(order))
    cells = rows.assign(cell=list(zip(rows["mean"], rows["ci_low"], rows["ci_high"])))
    table = cells.pivot(index=["family", "method"], columns=["cohort", "metric"], values="cell")
    return table[[(c, m) for c in cohort_order(rows) for m in order if (c, m) in table.columns]]


def _heads(table: pd.DataFrame) -> list[str]:
    """Column heads: the metric, and its cohort when there are several."""
    several = len({c for c, _ in table.columns}) > 1
    return [f"{METRIC_LABELS.get(m, m)} ({c})" if several else METRIC_LABELS.get(m, m) for c, m in table.columns]


def _fmt(value: float, decimals: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value * SCALE:.{decimals}f}"


def _cells(table: pd.DataFrame, decimals: int) -> tuple[dict, dict]:
    """Formatted cell text and whether it is the best (bold) in its column."""
    text, best = {}, {}
    for metric in table.columns:
        means = {idx: _fmt(c[0], decimals) for idx, c in table[metric].items() if isinstance(c, tuple)}
        shown = [float(v) for v in means.values() if v != "–"]
        top = max(shown) if shown else None
        for idx, c in table[metric].items():
            if not isinstance(c, tuple):  # a metric missing for this method
                text[idx, metric], best[idx, metric] = "–", False
                continue
            text[idx, metric] = f"{means[idx]} [{_fmt(c[1], decimals)}, {_fmt(c[2], decimals)}]"
            best[idx, metric] = top is not None and means[idx] != "–" and float(means[idx]) == top
    return text, best


def _groups(table: pd.DataFrame):
    for family, title in GROUPS:
        rows = [idx for idx in table.index if idx[0] == family]
        if rows:
            yield title, rows
    other = [idx for idx in table.index if idx[0] not in dict(GROUPS)]
    if other:
        yield "Other", other


def to_markdown(table: pd.DataFrame, decimals: int = 1) -> str:
    text, best = _cells(table, decimals)
    heads = _heads(table)
    lines = ["| Method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for title, rows in _groups(table):
        lines.append(f"| *{title}* |" + " |" * len(heads))
        for idx in rows:
            cells = [f"**{text[idx, m]}**" if best[idx, m] else text[idx, m] for m in table.columns]
            lines.append(f"| {idx[1]} | " + " | ".join(cells) + " |")
    note = f"Pooled over folds; bootstrap mean [95% CI] ×{SCALE:g}; best mean per column in bold."
    if len({c for c, _ in table.columns}) > 1:
        note = (f"{INTERNAL}: the pooled test folds; other cohorts: external, the fold models' ensemble. "
                f"Bootstrap mean [95% CI] ×{SCALE:g}; best mean per column in bold.")
    return "\n".join(lines) + f"\n\n{note}\n"


def to_latex(table: pd.DataFrame, decimals: int = 1, caption: str = "", label: str = "") -> str:
    """A booktabs table; ``caption`` is plain text (escaped here)."""
    text, best = _cells(table, decimals)
    cohorts = list(dict.fromkeys(c for c, _ in table.columns))
    heads = [tex_escape(METRIC_LABELS.get(m, m)) for _, m in table.columns]
    ncol = len(heads) + 1
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{tex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [r"\begin{tabular}{l" + "c" * len(heads) + "}", r"\toprule"]
    if len(cohorts) > 1:  # a header row of cohorts over their metrics (the paper's Table 3)
        spans = [sum(1 for c, _ in table.columns if c == cohort) for cohort in cohorts]
        lines.append(" & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(c)}}}"
                                        for c, n in zip(cohorts, spans)) + r" \\")
        start, rules = 2, []
        for n in spans:
            rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
            start += n
        lines.append(" ".join(rules))
    lines.append("Method & " + " & ".join(heads) + r" \\")
    for title, rows in _groups(table):
        lines += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{title}}}}} \\"]
        for idx in rows:
            cells = [rf"\textbf{{{tex_escape(text[idx, m])}}}" if best[idx, m] else tex_escape(text[idx, m])
                     for m in table.columns]
            lines.append(tex_escape(idx[1]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def weights_markdown(encoders: dict[str, dict]) -> str:
    """The encoder and checkpoint (sha256) behind each method, under the table."""
    if not encoders:
        return ""
    lines = ["", "Encoder weights:", "", "| Method | Encoder | Weights | sha256 |", "|---|---|---|---|"]
    for method, rec in sorted(encoders.items()):
        sha = rec.get("sha256")
        lines.append(f"| {method} | {rec.get('name') or ''} | {rec.get('weights') or 'random init'} | "
                     f"{sha[:16] + '…' if sha else '—'} |")
    return "\n".join(lines) + "\n"


def _write_text(text: str, path: Path) -> None:
    write_bytes(path, text.encode("utf-8"))


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", required=True, type=Path, help="results/metrics/{task}.tsv")
    ap.add_argument("--md-out", required=True, type=Path)
    ap.add_argument("--tex-out", required=True, type=Path)
    ap.add_argument("--decimals", type=int, default=1, help="decimals of the ×100 values")
    ap.add_argument("--caption", default=None, help="LaTeX caption (default names the task)")
    ap.add_argument("--runs", nargs="+", required=True, type=Path,
                    help="the runs' run.json: the encoder weights of each method are listed under the table")
    args = ap.parse_args(argv)
    task = args.metrics.stem
    try:
        table = pooled_table(pd.read_csv(args.metrics, sep="\t", dtype={"fold": str, "method": str}))
    except (OSError, ValueError) as err:
        logger.error("%s: %s", args.metrics, err)
        return 2
    unit = primary_unit(pd.read_csv(args.metrics, sep="\t", usecols=["unit"]))
    caption = args.caption or f"{task}: pooled test results per {unit}, bootstrap mean [95% CI] ×100; best in bold."
    if len({c for c, _ in table.columns}) > 1 and not args.caption:
        caption = (f"{task}: results per {unit}, internal (pooled test folds) and external cohorts (ensemble of "
                   "the fold models), bootstrap mean [95% CI] ×100; best in bold.")
    try:
        encoders = read_encoders(args.runs)
    except (OSError, ValueError) as err:
        logger.error("%s", err)
        return 2
    _write_text(to_markdown(table, args.decimals) + weights_markdown(encoders), args.md_out)
    _write_text(to_latex(table, args.decimals, caption, f"tab:{task}"), args.tex_out)
    logger.info("task %s: table of %d methods × %d cohort metrics → %s, %s", task, len(table),
                table.shape[1], args.md_out, args.tex_out)
    return 0
