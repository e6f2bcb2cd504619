# Sample sheet, config validation, input functions and wildcard constraints shared by all rules.
import functools
import json
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from e2epath import shards, sheets  # noqa: E402
from e2epath.devices import candidate_devices  # noqa: E402
from e2epath.methods import magnifications_used, resolve_methods, with_task_defaults  # noqa: E402

validate(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
STEP = str(Path(workflow.basedir) / "workflow" / "scripts" / "step.py")
ENVS = Path(workflow.basedir) / "envs"

# The demo cohort is planned (ids, paths) at parse time and written by the `demo_cohort` rule.
DEMO = config["demo"]["enabled"] and not Path(config["samples"]).exists()
if DEMO:
    from e2epath import demo

    SAMPLES = demo.plan(config["demo"]["n_slides"], config["demo"]["seed"])
    # absolute, as load_samples gives them: the next run reads the written sheet, same inputs
    SAMPLES["path"] = [str((Path(config["samples"]).parent / p).resolve()) for p in SAMPLES["path"]]
else:
    try:
        SAMPLES = sheets.validate_all(config)
    except sheets.SheetError as err:
        raise WorkflowError(str(err))
SAMPLES = SAMPLES.set_index("slide_id", drop=False)
SLIDES = list(SAMPLES.index)
TASKS = config["tasks"]
MAGS = config["preprocess"]["magnifications"]
try:
    METHODS = resolve_methods(config)
except ValueError as err:
    raise WorkflowError(str(err))
for name, spec in METHODS.items():
    missing = sorted(set(magnifications_used(spec)) - set(MAGS))
    if missing:
        raise WorkflowError(f"config: method {name!r} reads {missing}x patches but "
                            f"preprocess.magnifications is {MAGS}; add them there")
# GPU rules ask for one `gpu` where this machine has GPUs. On a CPU-only machine they ask for none,
# so `--resources gpu=1` does not make CPU training run one job at a time. The SLURM profile sets
# gpu: 1 for these rules itself (its submit host may have no GPU).
GPU = 1 if candidate_devices() else 0
# Large cohorts: preprocessing jobs per shard of slides instead of per slide (e2epath.shards).
SHARDS = shards.assign(SLIDES, config["preprocess"]["shards"]) if config["preprocess"]["shards"] else {}
if not SHARDS and len(SLIDES) > 3000:
    logger.warning(f"{len(SLIDES)} slides with one job per slide and step: Snakemake needs minutes to plan "
                   f"each run; set preprocess.shards to about {len(SLIDES) // 20} (config/README.md)")
E2E_METHODS = [m for m, spec in METHODS.items() if spec["family"] == "e2e"]
TS_METHODS = [m for m, spec in METHODS.items() if spec["family"] == "twostage"]


def folds():
    split = config["splits"]
    return list(range(split["k"])) if split["mode"] == "kfold" else [0]


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    shard=r"shard\d+",
    task="|".join(TASKS),
    mag=r"5|10|20|40",
    fold=r"\d+",
    method=r"[A-Za-z0-9._-]+",
    encoder=r"resnet18|resnet50",


def env(name):
    return str(ENVS / f"{name}.yaml")


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def sheet_mpp(wildcards):
    mpp = SAMPLES.loc[wildcards.slide, "mpp"]
    return None if mpp != mpp or mpp is None else float(mpp)  # NaN check


def case_of(wildcards):
    return SAMPLES.loc[wildcards.slide, "case_id"]


def method_spec(wildcards):
    task = TASKS[wildcards.task]
    return with_task_defaults(METHODS[wildcards.method], task["type"], task["n_bins"])


def method_json(wildcards):
    """A method's resolved hyper-parameters as a plain value: a change reruns only its jobs."""
    return json.dumps(method_spec(wildcards), sort_keys=True)


def method_rows(wildcards):
    """Manifest rows of the magnifications this method reads (another one added: no rerun)."""
    return patch_rows(magnifications_used(method_spec(wildcards)))


def per_unit(per_slide, per_shard, **wildcards):
    """Per-slide files, or with preprocess.shards the per-shard tables that list them."""
    if SHARDS:
        return expand(per_shard, shard=SHARDS, **wildcards)
    return expand(per_slide, slide=SLIDES, **wildcards)


@functools.cache
def _patch_rows(mags):
    return per_unit("results/patches/{mag}x/{slide}.json", "results/shards/patches/{mag}x/{shard}.json", mag=mags)


def patch_rows(mags):
    """Manifest rows of every slide at ``mags``, per slide or per shard (cached: every training
    job asks for them)."""
    return _patch_rows(tuple(mags))


def qc_records():
    return per_unit("results/slides/{slide}.json", "results/shards/qc/{shard}.json")


def thumbs():
    """Per-slide QC thumbnails (per-slide jobs only: shards list them in their tissue tables)."""
    return [] if SHARDS else expand("results/tissue/thumbs/{slide}.png", slide=SLIDES)


def tissue_tables():
    return expand("results/shards/tissue/{shard}.json", shard=SHARDS)


def shard_column(column, missing=None):
    """A sample-sheet column for the slides of a shard, as a plain list (a params value)."""

    def values(wildcards):
        col = SAMPLES.loc[SHARDS[wildcards.shard], column]
        return [missing if v is None or v != v else v for v in col]  # v != v: NaN

    return values


def shard_runtime(minutes_per_slide):
    return lambda wildcards: minutes_per_slide * len(SHARDS[wildcards.shard])


def fallback_mags(wildcards):
    """The feature magnification and the coarser ones it may fall back to (not finer ones:
    adding 40x must not redo 20x features)."""
    return [m for m in MAGS if m <= int(wildcards.mag)]


def predictions(task):
    e2e = expand("results/e2e/{task}/{method}/fold{fold}/predictions.tsv", task=task,
                 method=E2E_METHODS, fold=folds())
    ts = expand("results/twostage/{task}/{method}/fold{fold}/predictions.tsv", task=task,
                method=TS_METHODS, fold=folds())
    return e2e + ts


def all_outputs():
    outs = ["results/slides.tsv", "results/patches/manifest.tsv"]
    outs += expand("results/splits/{task}.tsv", task=TASKS)
    outs += expand("results/metrics/{task}.tsv", task=TASKS)
    outs += expand("results/tables/{task}.md", task=TASKS)
    outs += expand("results/figures/{task}", task=TASKS)
    outs += ["results/figures/cohort"]
    return outs
