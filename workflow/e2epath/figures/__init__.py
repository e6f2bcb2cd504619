"""Figures of a task (ROC or Kaplan–Meier, forest plot, training curves, attention heatmaps) and
the slide QC figures of a cohort (QC montage, patch counts, summary table).

`python -m e2epath figures_task --task T --task-type TYPE --metrics results/metrics/T.tsv
--slides results/slides.tsv --seed 0 --alpha 0.05 --out-dir results/figures/T [--n-boot 200]
[--n-attention 3] --runs RUN...` with RUN = a training run's run.json (`e2epath.core.layout`: its
predictions, history and attention are read from the run's folder).

`python -m e2epath figures_qc --slides results/slides.tsv --manifest results/patches/manifest.tsv
--out-dir results/figures/qc --thumbs [PNG or TABLE...]` (per-slide thumbnails, or with
preprocess.shards the tissue tables that list them).

Each figure is written as PNG and PDF. A figure whose inputs are missing or insufficient is
skipped with a logged reason (listed in ``figures.tsv``); the others are still written. The
folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import pandas as pd

from e2epath.core import schema
from e2epath.core.io import read_records, replace_dir
from e2epath.core.layout import load_tables, read_runs
from e2epath.core.vocabulary import INTERNAL, MAIN_METRIC, TASK_TYPES
from e2epath.evaluate.evaluation import primary_unit
from e2epath.figures.common import FigureSkipped, save_figure

logger = logging.getLogger(__name__)


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


def _task_figures(args: argparse.Namespace, out: Path) -> None:
    from e2epath.figures import curves, forest, heatmaps, roc, survival

    w = _Writer(out)
    runs = read_runs(args.runs, args.task)
    methods = load_tables(runs, "predictions", missing_ok=True)
    metrics = None
    if args.metrics.is_file():
        metrics = forest.read_metrics(args.metrics)
    else:
        logger.warning("metrics table %s does not exist", args.metrics)
    title = f"{args.task} ({args.task_type})"
    main = MAIN_METRIC[args.task_type]

    def need_methods():
        if not methods:
            raise FigureSkipped("no (non-empty) predictions files")
        return methods

    if args.task_type == "survival":
        w.figure("km", lambda: survival.plot_km(need_methods(), title=title))
    else:
        auc_ci = {}
        if metrics is not None:
            rows = metrics[(metrics["metric"] == "auc") & (metrics["fold"].astype(str) == "pooled")
                           & (metrics["cohort"] == INTERNAL)  # the internal test folds' predictions
                           & (metrics["unit"] == primary_unit(metrics))]  # the unit the predictions are in
            auc_ci = {r.method: (r.ci_low, r.ci_high) for r in rows.itertuples()}
        w.figure("roc", lambda: roc.plot_roc(need_methods(), args.task_type, args.n_boot, args.seed, args.alpha,
                                             auc_ci, title=title))

    def forest_fig():
        if metrics is None:
            raise FigureSkipped(f"metrics table {args.metrics} missing")
        return forest.plot_forest(metrics, main, title=title)

    w.figure("forest", forest_fig)
    w.figure("curves", lambda: curves.plot_curves(load_tables(runs, "history", missing_ok=True),
                                                  val_label=f"validation {main}", title=title))

    def attention_fig():
        with_attention = [r for r in runs if r.path("attention").is_file()]
        if not with_attention:
            raise FigureSkipped("none of the runs has an attention file")
        slides = pd.read_csv(args.slides, sep="\t", dtype={"slide_id": str})
        return heatmaps.plot_attention(with_attention, slides, args.n_attention, args.seed, title=title)

    w.figure("attention", attention_fig)
    w.finish()


def cli_task(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath figures_task", description="Figures of one task.")
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--metrics", type=Path, required=True, help="results/metrics/{task}.tsv")
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="the training runs' run.json files")
    ap.add_argument("--slides", type=Path, required=True, help="results/slides.tsv (slide paths, QC status)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--alpha", type=schema.arg_type("evaluate", "alpha"), required=True,
                    help="1 − confidence level of the ROC band (the config's evaluate.alpha)")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the ROC band")
    ap.add_argument("--n-attention", type=int, default=3, help="slides in the attention figure")
    args = ap.parse_args(argv)
    if args.n_boot < 1 or args.n_attention < 1:
        ap.error("--n-boot and --n-attention must be ≥ 1")
    try:
        replace_dir(args.out_dir, lambda tmp: _task_figures(args, tmp))
    except (OSError, ValueError) as err:  # bad input files: say which and why, no traceback
        logger.error("%s", err)
        return 2
    return 0


def _qc_figures(args: argparse.Namespace, out: Path) -> None:
    from e2epath.figures import qc

    slides = qc.read_table(args.slides, qc.SLIDE_COLUMNS, "slides.tsv")
    manifest = qc.read_table(args.manifest, qc.MANIFEST_COLUMNS, "manifest.tsv")
    given = list(map(Path, args.thumbs))
    thumbs = {p.stem: p for p in given if p.suffix == ".png"}  # per-slide thumbnails are named {slide}.png
    thumbs.update({r["slide_id"]: Path(r["thumb"]) for r in read_records(p for p in given if p.suffix == ".json")})
    w = _Writer(out)
    w.figure("qc_montage", lambda: qc.plot_qc_montage(slides, manifest, thumbs))
    w.figure("patch_counts", lambda: qc.plot_patch_counts(manifest))
    qc.cohort_summary(slides, manifest).to_csv(out / "cohort.tsv", sep="\t", index=False)
    w.finish()


def cli_qc(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath figures_qc", description="The slide QC figures of a cohort.")
    ap.add_argument("--slides", type=Path, required=True, help="results/slides.tsv")
    ap.add_argument("--manifest", type=Path, required=True, help="results/patches/manifest.tsv")
    ap.add_argument("--thumbs", nargs="*", required=True,
                    help="per-slide QC thumbnails named {slide}.png, or tissue shard tables (their `thumb` paths)")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        replace_dir(args.out_dir, lambda tmp: _qc_figures(args, tmp))
    except ValueError as err:
        logger.error("%s", err)
        return 2
    return 0
