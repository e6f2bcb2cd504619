"""The results tree: where every stage writes, and the layout of a training run.

Paths are relative to the run directory (Snakemake's ``--directory``) and written as Snakemake
patterns (``{slide}``, ``{mag}``, ``{task}``, ...). The rules take their inputs and outputs from
here; the package's steps are given their paths as arguments. Evaluation and figures read training
runs back through :class:`Run`, from each run's own ``run.json`` (family, task, method, fold), never
by parsing a path. docs/contracts.md describes what is in each file.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd

from e2epath.core.io import read_json, write_json
from e2epath.core.vocabulary import FAMILIES, TASK_TYPES, check_id

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ preprocessing (per slide)
QC_RECORD = "results/slides/{slide}.json"
QC_TABLE = "results/slides.tsv"
TISSUE_MASK = "results/tissue/masks/{slide}.png"
TISSUE_CONTOURS = "results/tissue/contours/{slide}.geojson"
TISSUE_THUMB = "results/tissue/thumbs/{slide}.png"
PATCH_STORE = "results/lmdb/{mag}x/{slide}.lmdb"
PATCH_ROW = "results/patches/{mag}x/{slide}.json"
MANIFEST = "results/patches/manifest.tsv"
FEATURES = "results/features/{encoder}/{mag}x/{slide}.pt"

# With preprocess.shards > 0 (e2epath.shards): one table per shard and step, listing the per-slide
# records (the per-slide files above keep their paths), and a marker per slide and step.
SHARD_TABLES = {
    "qc": "results/shards/qc/{shard}.json",
    "tissue": "results/shards/tissue/{shard}.json",
    "patch": "results/shards/patches/{mag}x/{shard}.json",
    "features": "results/shards/features/{encoder}/{mag}x/{shard}.json",
}
SHARD_MARKERS = {
    "qc": "results/shards/done/qc",
    "tissue": "results/shards/done/tissue",
    "patch": "results/shards/done/patch/{mag}x",
    "features": "results/shards/done/features/{encoder}/{mag}x",
}

# An encoder's checkpoint — torchvision's ImageNet weights fetched once into the torch cache
# (source imagenet), or a file of the local Hugging Face cache (source hub): where it is, and its hash
WEIGHTS_RECORD = "results/weights/{source}/{encoder}.json"
WEIGHTS_SOURCES = ("imagenet", "hub")

# `python -m e2epath predict`: what it writes per slide into its --out folder
PREDICT_FILES = {
    "summary": "{slide}.json",
    "predictions": "{slide}.predictions.tsv",
    "map": "{slide}.attention.png",
    "montage": "{slide}.montage.png",
    "geojson": "{slide}.attention.geojson",
}

# ------------------------------------------------------------------ per task
SPLITS = "results/splits/{task}.tsv"
METRICS = "results/metrics/{task}.tsv"
PAIRED = "results/metrics/{task}_paired.tsv"
TABLE_MD = "results/tables/{task}.md"
TABLE_TEX = "results/tables/{task}.tex"
TASK_FIGURES = "results/figures/{task}"
QC_FIGURES = "results/figures/qc"  # the slide QC figures of a cohort (montage, patch counts, summary)

# Slide-level attention maps of a method's test slides (every fold's), files per slide as PREDICT_FILES
MAPS = "results/maps/{task}/{method}"
MAPS_INDEX = "index.tsv"  # in a maps folder: one row per slide, its status and files

# ------------------------------------------------------------------ external cohorts (config `cohorts:`)
# A cohort's slides go through the training cohort's preprocessing into a tree of their own, the
# per-slide and per-cohort files above under COHORT_DIR (`in_cohort`), so the training cohort's files
# and reruns are untouched. Every fold model of a method predicts every bag of the cohort:
COHORT_DIR = "results/cohorts/{cohort}"
COHORT_PREDICTIONS = "results/cohorts/{cohort}/predictions/{task}/{method}"
COHORT_FILES = {
    "predictions": "fold{fold}.tsv",  # a fold model's predictions (the test predictions' columns)
    "attention": "fold{fold}.attention.npz",  # its attention (the training runs' attention.npz format)
    "ensemble": "ensemble.tsv",  # mean probability / risk over the fold models
    "record": "prediction.json",  # task, method, family, cohort, folds, the model files and their sha256
}


def in_cohort(pattern: str, cohort: str = "{cohort}") -> str:
    """A ``results/...`` pattern of the training cohort → the same file of external cohort ``cohort``."""
    if not pattern.startswith("results/"):
        raise ValueError(f"{pattern}: not a results/ path")
    return f"{COHORT_DIR.format(cohort=cohort)}/{pattern[len('results/'):]}"


def cohort_file(name: str, cohort: str = "{cohort}", task: str = "{task}", method: str = "{method}",
                fold: int | str = "{fold}") -> str:
    """Path (or pattern) of file ``name`` (COHORT_FILES) of a method's predictions of a cohort."""
    folder = COHORT_PREDICTIONS.format(cohort=cohort, task=task, method=method)
    return f"{folder}/{COHORT_FILES[name].format(fold=fold)}"


# ------------------------------------------------------------------ a training run
RUN_DIR = "results/{family}/{task}/{method}/fold{fold}"
RUN_FILES = {
    "model": "model.pt",
    "history": "history.tsv",
    "predictions": "predictions.tsv",
    "attention": "attention.npz",
    "run": "run.json",
}
CHECKPOINT = "checkpoint.pt"  # in the run folder while training; removed when the job finishes
RUN_FORMAT = 1


# ------------------------------------------------------------------ every job's log and benchmark
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"


def log(job: str, cohort: str | None = None) -> str:
    """The log of a job (``job``: a pattern such as ``slide_qc/{slide}``); an external cohort's job's
    under ``cohorts/{cohort}/``."""
    return f"{LOGS}/{_job_name(job, cohort)}.log"


def benchmark(job: str, cohort: str | None = None) -> str:
    """The benchmark (time, memory) of a job, named as its log."""
    return f"{BENCHMARKS}/{_job_name(job, cohort)}.tsv"


def _job_name(job: str, cohort: str | None) -> str:
    return job if cohort is None else f"cohorts/{cohort}/{job}"


def folder(pattern: str) -> str:
    """The folder of a per-item pattern: ``results/slides/{slide}.json`` → ``results/slides``."""
    return str(PurePosixPath(pattern).parent)


def run_outputs(family: str) -> dict[str, str]:
    """The files of a training run of ``family`` by name, as patterns (a training rule's outputs)."""
    return {name: run_file(name, family) for name in RUN_FILES}


def run_file(name: str, family: str = "{family}", task: str = "{task}", method: str = "{method}",
             fold: int | str = "{fold}") -> str:
    """Path (or Snakemake pattern, for the parts left out) of file ``name`` of a training run."""
    return f"{RUN_DIR.format(family=family, task=task, method=method, fold=fold)}/{RUN_FILES[name]}"


@dataclass(frozen=True)
class Run:
    """One training run — a task × method × fold of a family — and where its files are."""

    family: str
    task: str
    task_type: str
    method: str
    fold: int
    folder: Path

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"run family {self.family!r} is not one of {FAMILIES}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"run task type {self.task_type!r} is not one of {TASK_TYPES}")
        check_id(self.task, "task")
        check_id(self.method, "method")

    @property
    def key(self) -> tuple[str, str]:
        """(family, method): what the folds of one method share."""
        return self.family, self.method

    def path(self, name: str) -> Path:
        return self.folder / RUN_FILES[name]

    def write(self, encoder: dict | None = None) -> None:
        """Write ``run.json`` (atomically) into the run's folder; ``encoder``: which encoder and
        weights (path, sha256) the run's features came from, for tables and the report."""
        meta = {k: v for k, v in asdict(self).items() if k != "folder"}
        write_json(self.path("run"), {**meta, "format_version": RUN_FORMAT, "encoder": encoder})

    @classmethod
    def read(cls, path: str | Path) -> "Run":
        """The run whose ``run.json`` is ``path``; the error names the file and the key."""
        path = Path(path)
        meta = read_json(path)
        missing = [k for k in ("family", "task", "task_type", "method", "fold") if k not in meta]
        if missing:
            raise ValueError(f"{path}: run.json lacks {', '.join(missing)}; rerun its training job")
        try:
            return cls(meta["family"], meta["task"], meta["task_type"], meta["method"], int(meta["fold"]),
                       path.parent)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def read_runs(paths: Iterable[str | Path], task: str | None = None) -> list[Run]:
    """The runs of ``run.json`` files; each must belong to ``task`` when one is given, and a method
    name means one family (tables and figures name methods by name alone)."""
    runs = [Run.read(p) for p in paths]
    family: dict[str, str] = {}
    for run in runs:
        if task is not None and run.task != task:
            raise ValueError(f"{run.path('run')}: belongs to task {run.task!r}, not {task!r}")
        if family.setdefault(run.method, run.family) != run.family:
            raise ValueError(f"{run.path('run')}: method {run.method!r} is both {family[run.method]} and "
                             f"{run.family}; method names are unique across families")
    return runs


def read_table(path: str | Path) -> pd.DataFrame:
    """A TSV of a run with ids and labels kept as text; a 0-byte file reads as no rows."""
    try:
        return pd.read_csv(path, sep="\t", dtype={"case_id": str, "label": str, "slide_id": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_tables(runs: list[Run], name: str, missing_ok: bool = False) -> dict[tuple[str, str], dict[int, pd.DataFrame]]:
    """{(family, method): {fold: table}} of the runs' ``name`` TSVs (predictions, history).

    Empty tables are left out with a log line (an empty test fold); a method whose every table is
    empty is left out. A missing file is an error, or with ``missing_ok`` logged and left out.
    """
    out: dict[tuple[str, str], dict[int, pd.DataFrame]] = {}
    for run in runs:
        path = run.path(name)
        if not path.is_file():
            if not missing_ok:
                raise FileNotFoundError(f"{path}: {name} of {run.family}/{run.method} fold {run.fold} is missing; "
                                        "rerun its training job")
            logger.warning("%s file %s does not exist — left out", name, path)
            continue
        df = read_table(path)
        folds = out.setdefault(run.key, {})
        if run.fold in folds:
            raise ValueError(f"{path}: fold {run.fold} of {run.family}/{run.method} given twice")
        if df.empty:
            logger.warning("%s: no rows (empty test fold) — left out", path)
            continue
        folds[run.fold] = df
    for (family, method), folds in out.items():
        if not folds:
            logger.warning("%s/%s: every %s table is empty — method left out", family, method, name)
    return {k: v for k, v in out.items() if v}


def read_encoders(paths: Iterable[str | Path]) -> dict[str, dict]:
    """method → the encoder record of its runs' ``run.json`` (name, weights, path, sha256); the
    first fold's where folds agree, which they must (one checkpoint per method)."""
    out: dict[str, dict] = {}
    for path in paths:
        meta = read_json(Path(path))
        rec = meta.get("encoder")
        if not rec:
            continue
        seen = out.setdefault(meta["method"], rec)
        if seen.get("sha256") != rec.get("sha256"):
            raise ValueError(f"{path}: method {meta['method']!r} fold {meta.get('fold')} used weights "
                             f"{rec.get('path')} ({rec.get('sha256')}), another fold {seen.get('path')} "
                             f"({seen.get('sha256')}); rerun the method's jobs")
    return out
