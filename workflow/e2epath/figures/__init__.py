"""Figures of a task (ROC or Kaplan–Meier, forest plot, training curves, attention heatmaps) and
of the cohort (QC montage, patch counts, summary table).

`python -m e2epath figures_task --task T --task-type TYPE --metrics results/metrics/T.tsv
--predictions P... --histories H... --attention A... --qc-dir results/slides --out-dir
results/figures/T [--slides results/slides.tsv] [--seed 0] [--n-boot 200] [--n-attention 3]`

`python -m e2epath figures_cohort --slides results/slides.tsv --manifest
results/patches/manifest.tsv --thumbs-dir results/tissue/thumbs --out-dir results/figures/cohort
[--thumbs PNG...]`

Each figure is written as PNG and PDF. A figure whose inputs are missing or insufficient is
skipped with a logged reason (listed in ``figures.tsv``); the others are still written. The
folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from e2epath.figures.common import FigureSkipped, existing_runs, load_by_method, save_figure
from e2epath.io import atomic_path, read_records

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "grading", "survival")
MAIN_METRIC = {"classification": "auc", "grading": "qwk", "survival": "c_index"}


class _Writer:
    """Builds figures into a folder; records what was written and what was skipped, and why."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: list[tuple[str, str, str]] = []

    def figure(self, name: str, build: Callable) -> None:
        try:
            fig = build()
        except FigureSkipped as why:
            logger.warning("figure %s skipped: %s", name, why)
            self.rows.append((name, "skipped", str(why)))
            return
        save_figure(fig, self.folder, name)
        logger.info("figure %s written", name)
        self.rows.append((name, "written", ""))

    def finish(self) -> None:
        pd.DataFrame(self.rows, columns=["figure", "status", "reason"]).to_csv(
            self.folder / "figures.tsv", sep="\t", index=False)


def _replace_dir(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``out_dir``, then put it in place of ``out_dir``."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        fill(tmp)
        if out_dir.exists():  # a rerun by hand: os.replace cannot overwrite a full folder
            shutil.rmtree(out_dir)


def _need(paths: list[str], what: str) -> list[str]:
    if not paths:
        raise FigureSkipped(f"no {what} files given")
    return paths


def _task_figures(args: argparse.Namespace, out: Path) -> None:
    from e2epath.figures import curves, forest, heatmaps, roc, survival

    w = _Writer(out)
    preds = existing_runs(args.predictions, "predictions")
    for r in preds:
        if r.task != args.task:
            raise ValueError(f"{r.path}: belongs to task {r.task!r}, not --task {args.task!r}")
    methods = load_by_method(preds)
    families = {m: f for f, m in methods}
    metrics = None
    if args.metrics is not None and args.metrics.is_file():
        metrics = forest.read_metrics(args.metrics, families)
    elif args.metrics is not None:
        logger.warning("metrics table %s does not exist", args.metrics)
    title = f"{args.task} ({args.task_type})"

    def need_methods():
        if not methods:
            raise FigureSkipped("no (non-empty) predictions files")
        return methods

    if args.task_type == "survival":
        w.figure("km", lambda: survival.plot_km(need_methods(), title=title))
    else:
        auc_ci = {}
        if metrics is not None:
            rows = metrics[(metrics["metric"] == "auc") & (metrics["fold"].astype(str) == "pooled")]
            auc_ci = {r.method: (r.ci_low, r.ci_high) for r in rows.itertuples()}
        w.figure("roc", lambda: roc.plot_roc(need_methods(), args.n_boot, args.seed, auc_ci, title=title))

    def forest_fig():
        if metrics is None:
            raise FigureSkipped(f"metrics table {args.metrics} missing")
        return forest.plot_forest(metrics, MAIN_METRIC[args.task_type], title=title)

    w.figure("forest", forest_fig)
    w.figure("curves", lambda: curves.plot_curves(
        load_by_method(existing_runs(_need(args.histories, "history"), "history")),
        val_label=f"validation {MAIN_METRIC[args.task_type]}", title=title))

    def attention_fig():
        files = existing_runs(_need(args.attention, "attention"), "attention")
        if not files:
            raise FigureSkipped("none of the attention files exists")
        slides = None
        if args.slides is not None and args.slides.is_file():
            slides = pd.read_csv(args.slides, sep="\t", dtype={"slide_id": str})
        return heatmaps.plot_attention(files, args.qc_dir, slides, args.n_attention, args.seed, title=title)

    w.figure("attention", attention_fig)
    w.finish()


def cli_task(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath figures_task", description="Figures of one task.")
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--metrics", type=Path, default=None, help="results/metrics/{task}.tsv")
    ap.add_argument("--predictions", nargs="*", default=[], help=".../fold{k}/predictions.tsv")
    ap.add_argument("--histories", nargs="*", default=[], help=".../fold{k}/history.tsv")
    ap.add_argument("--attention", nargs="*", default=[], help=".../fold{k}/attention.npz")
    ap.add_argument("--qc-dir", type=Path, default=None, help="results/slides (QC JSON with the slide path)")
    ap.add_argument("--slides", type=Path, default=None, help="results/slides.tsv (fallback for slide paths)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the ROC band")
    ap.add_argument("--n-attention", type=int, default=3, help="slides in the attention figure")
    args = ap.parse_args(argv)
    if args.n_boot < 1 or args.n_attention < 1:
        ap.error("--n-boot and --n-attention must be ≥ 1")
    try:
        _replace_dir(args.out_dir, lambda tmp: _task_figures(args, tmp))
    except ValueError as err:  # bad input files: say which and why, no traceback
        logger.error("%s", err)
        return 2
    return 0


def _cohort_figures(args: argparse.Namespace, out: Path) -> None:
    from e2epath.figures import qc

    slides = qc.read_table(args.slides, qc.SLIDE_COLUMNS, "slides.tsv")
    manifest = qc.read_table(args.manifest, qc.MANIFEST_COLUMNS, "manifest.tsv")
    thumbs = {}
    for p in map(Path, args.thumbs):
        thumbs[p.stem[:-3] if p.stem.endswith("_qc") else p.stem] = p
    thumbs.update({r["slide_id"]: Path(r["thumb"]) for r in read_records(args.tissue)})
    w = _Writer(out)
    w.figure("qc_montage", lambda: qc.plot_qc_montage(slides, manifest, args.thumbs_dir, thumbs))
    w.figure("patch_counts", lambda: qc.plot_patch_counts(manifest))
    qc.cohort_summary(slides, manifest).to_csv(out / "cohort.tsv", sep="\t", index=False)
    w.finish()


def cli_cohort(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath figures_cohort", description="Figures of the cohort.")
    ap.add_argument("--slides", type=Path, required=True, help="results/slides.tsv")
    ap.add_argument("--manifest", type=Path, required=True, help="results/patches/manifest.tsv")
    ap.add_argument("--thumbs-dir", type=Path, default=None, help="folder of {slide}.png QC thumbnails")
    ap.add_argument("--thumbs", nargs="*", default=[],
                    help="QC thumbnails named {slide}.png or {slide}_qc.png (before --thumbs-dir)")
    ap.add_argument("--tissue", nargs="*", default=[], help="tissue shard tables (their `thumb` paths)")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        _replace_dir(args.out_dir, lambda tmp: _cohort_figures(args, tmp))
    except ValueError as err:
        logger.error("%s", err)
        return 2
    return 0
