# Read by all the rules: the resolved config (e2epath.config.resolve — the cohorts and their sample
# sheets and shards, the methods with their hyper-parameters, the encoders, the magnifications, all
# computed and checked in the package), input functions, wildcard constraints and per-job resources.
# Paths come from e2epath.core.layout, names from e2epath.core.vocabulary.
import functools
import json
import re
import sys
from pathlib import Path

from snakemake.logging import logger

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from e2epath.config.resolve import preprocess_json, resolve, validate  # noqa: E402
from e2epath.core import layout, schema  # noqa: E402
from e2epath.core.devices import candidate_devices  # noqa: E402
from e2epath.core.vocabulary import FAMILIES, ID_PATTERN, MAGNIFICATIONS  # noqa: E402
from e2epath.models.presets import weights_source  # noqa: E402
from e2epath.train.recipe import job_encoder_spec, magnifications_used  # noqa: E402

validate(config)  # the schema fills the defaults in
try:
    PLAN = resolve(config)
except schema.ConfigError as err:
    raise WorkflowError(str(err))
for _warning in PLAN.warnings:
    logger.warning(_warning)

TASKS = PLAN.tasks
METHODS = PLAN.methods.methods  # task → method → the hyper-parameters its jobs receive
FAMILY = PLAN.methods.families
MAGS = PLAN.methods.magnifications
TRAINING = PLAN.training
COHORTS = PLAN.cohorts  # external cohorts by name
PREPROCESS_JSON = preprocess_json(PLAN)  # recorded in model files: new slides are prepared the same way
SHARDED = config["preprocess"]["shards"] > 0
# GPU rules ask for one `gpu` where this machine has GPUs. On a CPU-only machine they ask for none,
# so `--resources gpu=1` does not make CPU training run one job at a time. The SLURM profile sets
# gpu: 1 for these rules itself (its submit host may have no GPU).
GPU = 1 if candidate_devices() else 0
# Minutes one slide takes per step (SLURM time limits): a per-slide job asks for this, a shard job
# for this times its slides, a SLURM group for the sum of its members'.
MINUTES_PER_SLIDE = {"slide_qc": 2, "tissue": 5, "patch": 15, "extract_features": 10}
# Cores of a patch or feature job: its reading / decoding threads.
SLIDE_THREADS = 2
# Memory and time of a training job by family.
TRAINING_MB = {"e2e": 16000, "twostage": 8000}
TRAINING_MINUTES = {"e2e": 24 * 60, "twostage": 6 * 60}


wildcard_constraints:
    slide=ID_PATTERN,
    shard=r"shard\d+",
    task="|".join(TASKS),
    mag="|".join(map(str, MAGNIFICATIONS)),
    fold=r"\d+",
    method=ID_PATTERN,
    family="|".join(FAMILIES),
    encoder="|".join(re.escape(name) for name in PLAN.methods.encoders),
    source="|".join(layout.WEIGHTS_SOURCES),
    cohort="|".join(re.escape(name) for name in COHORTS) or "(?!)",  # no cohorts: matches nothing


# ------------------------------------------------------------------ resources


def per_attempt(mb):
    """Memory that grows with the attempt: a job killed for memory is retried with more (SLURM
    profile: `retries`)."""
    return lambda wildcards, attempt: mb * attempt


def slide_minutes(step):
    """A per-slide step's time limit: its minutes per slide, times the slides of a shard job."""
    return lambda wildcards: MINUTES_PER_SLIDE[step] * (len(shard_slides(wildcards)) if "shard" in wildcards.keys() else 1)


def job_threads(wildcards, threads):
    """The job's cores, as a params value: the threads a patch or feature job reads or decodes with."""
    return threads


def training_mb(wildcards, attempt):
    return TRAINING_MB[FAMILY[wildcards.method]] * attempt


def training_minutes(wildcards):
    return TRAINING_MINUTES[FAMILY[wildcards.method]]


def training_threads(wildcards):
    """An E2E job decodes in its loader workers besides the main process; two-stage needs one core."""
    spec = method_spec(wildcards)
    return 1 + spec["workers"] if spec["family"] == "e2e" else 1


def feature_mb(wildcards, attempt):
    """A feature job's memory: a foundation model's checkpoint is gigabytes (ViT-g: 4.5 GB in fp32)."""
    return (16000 if PLAN.methods.feature_encoders[wildcards.encoder]["foundation"] else 8000) * attempt


# ------------------------------------------------------------------ cohorts, slides and shards


def cohort_of(wildcards):
    """The cohort a job works on: an external one (a `cohort` wildcard) or the training cohort."""
    return PLAN.cohort(wildcards.get("cohort"))


def sheet_value(column, missing=None):
    """A sample-sheet column of a job's slide; of a shard job's slides, as a plain list."""

    def value(v):
        return missing if v is None or v != v else v  # v != v: NaN

    def get(wildcards):
        sheet = cohort_of(wildcards).sheet
        if "shard" in wildcards.keys():
            return [value(v) for v in sheet.loc[shard_slides(wildcards), column]]
        return value(sheet.loc[wildcards.slide, column])

    return get


def shard_slides(wildcards):
    return cohort_of(wildcards).shards[wildcards.shard]


def per_unit(per_slide, per_shard, cohort=TRAINING, **wildcards):
    """A cohort's per-slide files, or with preprocess.shards the per-shard tables that list them."""
    if cohort.shards:
        return expand(cohort.path(per_shard), shard=cohort.shards, **wildcards)
    return expand(cohort.path(per_slide), slide=cohort.slides, **wildcards)


@functools.cache
def _patch_rows(mags, cohort_name):
    return per_unit(layout.PATCH_ROW, layout.SHARD_TABLES["patch"], PLAN.cohort(cohort_name), mag=mags)


def patch_rows(mags, cohort=TRAINING):
    """Manifest rows of every slide of a cohort at ``mags``, per slide or per shard (cached: every
    training job asks for them)."""
    return _patch_rows(tuple(mags), None if cohort is TRAINING else cohort.name)


def qc_records(wildcards):
    return per_unit(layout.QC_RECORD, layout.SHARD_TABLES["qc"], cohort_of(wildcards))


def cohort_patch_rows(wildcards):
    """The rows of the magnifications a cohort is patched at (the training cohort: all of them)."""
    cohort = cohort_of(wildcards)
    return patch_rows(PLAN.methods.cohort_magnifications if cohort.external else MAGS, cohort)


def thumbs(wildcards):
    """A cohort's QC thumbnails: per slide, or with shards the tissue tables that list them."""
    cohort = cohort_of(wildcards)
    if cohort.shards:
        return expand(cohort.path(layout.SHARD_TABLES["tissue"]), shard=cohort.shards)
    return expand(cohort.path(layout.TISSUE_THUMB), slide=cohort.slides)


def fallback_rows(wildcards):
    """The rows a feature job reads: the feature magnification and the coarser ones it may fall
    back to (not finer ones: adding 40x must not redo 20x features), of its slide or shard."""
    cohort = cohort_of(wildcards)
    mags = [m for m in MAGS if m <= int(wildcards.mag)]
    if "shard" in wildcards.keys():
        return expand(cohort.path(layout.SHARD_TABLES["patch"]), mag=mags, shard=wildcards.shard)
    return expand(cohort.path(layout.PATCH_ROW), mag=mags, slide=wildcards.slide)


def of_cohort(pattern):
    """A results pattern as a params value: the job's cohort's path, its wildcards filled in."""
    return lambda wildcards: cohort_of(wildcards).path(pattern).format(**dict(wildcards.items()))


# ------------------------------------------------------------------ tasks, methods, training


def task_labels(wildcards):
    return TASKS[wildcards.task]["labels"]


def task_type(wildcards):
    return TASKS[wildcards.task]["type"]


def method_spec(wildcards):
    return METHODS[wildcards.task][wildcards.method]


def method_json(wildcards):
    """A method's resolved hyper-parameters as a plain value: a change reruns only its jobs."""
    return json.dumps(method_spec(wildcards), sort_keys=True)


def method_inputs(wildcards):
    """What a method's jobs read of a cohort: E2E the manifest rows of the magnifications it reads
    (training) or evaluates at (prediction); two-stage its encoder's features."""
    spec, cohort = method_spec(wildcards), cohort_of(wildcards)
    if spec["family"] == "e2e":
        return patch_rows([spec["eval_magnification"]] if cohort.external else magnifications_used(spec), cohort)
    return per_unit(layout.FEATURES, layout.SHARD_TABLES["features"], cohort, encoder=spec["encoder"],
                    mag=config["twostage"]["magnification"])


def weights_input(weights, encoder):
    """What an encoder's weights make a job depend on: the encoder_weights job's record (imagenet,
    hf: ids), a weights file (a new file reruns the job), or nothing (random initialisation)."""
    source = weights_source(weights)
    if source in layout.WEIGHTS_SOURCES:
        return [layout.WEIGHTS_RECORD.format(source=source, encoder=encoder)]
    return [] if weights is None else [weights]


def method_weights(wildcards):
    spec = method_spec(wildcards)
    return weights_input(spec["weights"], spec["encoder"]) if spec["family"] == "e2e" else []


def record_weights(wildcards):
    """The weights an encoder_weights job records: imagenet, or the encoder's hf: id."""
    return "imagenet" if wildcards.source == "imagenet" else PLAN.methods.encoders[wildcards.encoder]["weights"]


def encoder_arch(wildcards):
    return PLAN.methods.encoders[wildcards.encoder]["arch"]


def feature_encoder_json(wildcards):
    """The encoder's preset as a plain value: changing it reruns only its feature jobs."""
    return json.dumps(job_encoder_spec(PLAN.methods.feature_encoders[wildcards.encoder]), sort_keys=True)


def feature_weights(wildcards):
    """imagenet, hf:..., or a file; None (left out of the command line): random initialisation."""
    return PLAN.methods.feature_encoders[wildcards.encoder]["weights"]


def feature_pretrained(wildcards):
    return weights_input(feature_weights(wildcards), wildcards.encoder)


def run_files(task, name):
    """File ``name`` (e2epath.core.layout.RUN_FILES) of every training run of ``task``."""
    return [layout.run_file(name, FAMILY[m], task, m, k) for m in METHODS[task] for k in PLAN.folds]


def task_runs(wildcards):
    return run_files(wildcards.task, "run")


def method_models(wildcards):
    """The fold models of a method (every fold predicts an external cohort)."""
    m = wildcards.method
    return [layout.run_file("model", FAMILY[m], wildcards.task, m, k) for k in PLAN.folds]


def method_attention(wildcards):
    """The attention of a method's test slides (every fold's), or of its predictions of a cohort."""
    if "cohort" in wildcards.keys():
        return [layout.cohort_file("attention", wildcards.cohort, wildcards.task, wildcards.method, k)
                for k in PLAN.folds]
    return [layout.run_file("attention", FAMILY[wildcards.method], wildcards.task, wildcards.method, k)
            for k in PLAN.folds]


def method_rows(wildcards):
    """The stores a method's maps show patches of (its evaluation magnification, after the contours)."""
    return patch_rows([method_spec(wildcards)["eval_magnification"]], cohort_of(wildcards))


# ------------------------------------------------------------------ external cohorts


def cohort_labels(cohort, task):
    """A cohort's label table of ``task``, or None (predicted, not scored)."""
    return COHORTS[cohort].labels.get(task)


def labels_of_cohort(wildcards):
    path = cohort_labels(wildcards.cohort, wildcards.task)
    return [path] if path else []


def labelled_cohorts(task):
    return [c for c in COHORTS if cohort_labels(c, task)]


def cohort_predictions(wildcards):
    """Every method's predictions of every cohort labelled for the task (what its evaluation reads)."""
    task = wildcards.task
    return [layout.cohort_file("record", c, task, m) for c in labelled_cohorts(task) for m in METHODS[task]]


def map_methods(task):
    """Methods whose attention is worth a map (mean pooling's is uniform)."""
    return [m for m, spec in METHODS[task].items() if spec["aggregator"] != "mean"]


def all_outputs():
    outs = [layout.QC_TABLE, layout.MANIFEST, layout.QC_FIGURES]
    for pattern in (layout.SPLITS, layout.METRICS, layout.TABLE_MD, layout.TASK_FIGURES):
        outs += expand(pattern, task=TASKS)
    outs += predict_outputs()
    if config["maps"]["enabled"]:
        outs += [layout.MAPS.format(task=t, method=m) for t in TASKS for m in map_methods(t)]
    return outs


def predict_outputs():
    """Every method's predictions of every external cohort (the `predict` target), their maps and
    each cohort's QC figures."""
    outs = []
    for cohort in COHORTS:
        outs.append(layout.in_cohort(layout.QC_FIGURES, cohort))
        for task in TASKS:
            outs += [layout.cohort_file("ensemble", cohort, task, m) for m in METHODS[task]]
            if config["maps"]["enabled"]:
                outs += [layout.in_cohort(layout.MAPS, cohort).format(task=task, method=m) for m in map_methods(task)]
    return outs
