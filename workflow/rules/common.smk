# Sample sheet, config validation, input functions and wildcard constraints shared by all rules.
# Paths come from e2epath.layout, names (ids, magnifications, encoders) from e2epath.vocabulary.
import functools
import json
import re
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from e2epath.core import layout  # noqa: E402
from e2epath.preprocess import shards  # noqa: E402
from e2epath.sources import sheets  # noqa: E402
from e2epath.core.devices import candidate_devices  # noqa: E402
from e2epath.train.recipe import ConfigError, feature_encoders, job_encoder_spec, magnifications_used, resolve  # noqa: E402
from e2epath.models.presets import resolve_encoders, weights_source  # noqa: E402
from e2epath.core.vocabulary import FAMILIES, ID_PATTERN, MAGNIFICATIONS  # noqa: E402

validate(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")

# The demo cohort is planned (ids, paths) at parse time and written by the `demo_cohort` rule.
DEMO = config["demo"]["enabled"] and not Path(config["samples"]).exists()
if DEMO:
    from e2epath.sources import demo

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
# External cohorts (config `cohorts:`): name → sample sheet, validated with their label tables at
# parse time; a demo cohort (`cohorts.<name>.demo`) is planned here and written by `demo_external`.
COHORTS = {}
DEMO_COHORTS = {}
for _name, _spec in config["cohorts"].items():
    if config["demo"]["enabled"] and _spec.get("demo") is not None and not Path(_spec["samples"]).exists():
        from e2epath.sources import demo

        DEMO_COHORTS[_name] = _spec["demo"]
        _sheet = demo.plan_external(_spec["demo"]["n_slides"], _spec["demo"]["seed"])
        _sheet["path"] = [str((Path(_spec["samples"]).parent / p).resolve()) for p in _sheet["path"]]
    else:
        try:
            _sheet = sheets.validate_cohort(_name, _spec, TASKS, training_cases=set(SAMPLES["case_id"]))
        except sheets.SheetError as err:
            raise WorkflowError(str(err))
    COHORTS[_name] = _sheet.set_index("slide_id", drop=False)
MAGS = config["preprocess"]["magnifications"]
try:
    RESOLVED = resolve(config)  # task → method → the hyper-parameters its jobs receive (e2epath.methods)
    FEATURE_ENCODERS = feature_encoders(config)  # twostage.encoders → preset with the config's changes
except ConfigError as err:
    raise WorkflowError(str(err))
ENCODER_SPECS = resolve_encoders(config)  # every encoder a job may name (presets and the config's own)
FAMILY = {name: spec["family"] for specs in RESOLVED.values() for name, spec in specs.items()}
for task, specs in RESOLVED.items():
    for name, spec in specs.items():
        missing = sorted(set(magnifications_used(spec)) - set(MAGS))
        if missing:
            raise WorkflowError(f"config: method {name!r} reads {missing}x patches for task {task!r} (its sampling "
                                f"and evaluation magnifications) but preprocess.magnifications is {MAGS}; add "
                                "them there, or set the method's sampling")
# What a model file records of the preprocessing (not the magnification list or sharding: adding 40x
# or shards reruns no training), so `python -m e2epath predict` prepares new slides the same way.
# What an external cohort is patched at: the magnifications the methods predict from (E2E: the
# evaluation one; two-stage: the feature one and the coarser ones its features may fall back to).
COHORT_MAGS = sorted(
    {spec["eval_magnification"] for specs in RESOLVED.values() for spec in specs.values() if spec["family"] == "e2e"}
    | {m for m in MAGS if m <= config["twostage"]["magnification"]
       if any(spec["family"] == "twostage" for specs in RESOLVED.values() for spec in specs.values())}
)
PREPROCESS_JSON = json.dumps({k: v for k, v in config["preprocess"].items() if k not in ("magnifications", "shards")},
                             sort_keys=True)
# GPU rules ask for one `gpu` where this machine has GPUs. On a CPU-only machine they ask for none,
# so `--resources gpu=1` does not make CPU training run one job at a time. The SLURM profile sets
# gpu: 1 for these rules itself (its submit host may have no GPU).
GPU = 1 if candidate_devices() else 0
# Large cohorts: preprocessing jobs per shard of slides instead of per slide (e2epath.shards).
SHARDS = shards.assign(SLIDES, config["preprocess"]["shards"]) if config["preprocess"]["shards"] else {}
if not SHARDS and len(SLIDES) > 3000:
    logger.warning(f"{len(SLIDES)} slides with one job per slide and step: Snakemake needs minutes to plan "
                   f"each run; set preprocess.shards to about {len(SLIDES) // 20} (config/README.md)")
# Minutes one slide takes per step (SLURM time limits): a per-slide job asks for this, a shard job
# for this times its slides, a SLURM group for the sum of its members'.
MINUTES_PER_SLIDE = {"slide_qc": 2, "tissue": 5, "patch": 15, "extract_features": 10}
# Cores of a patch or feature job: its reading / decoding threads.
SLIDE_THREADS = 2


def per_attempt(mb):
    """Memory that grows with the attempt: a job killed for memory is retried with more (SLURM
    profile: `retries`)."""
    return lambda wildcards, attempt: mb * attempt


def folds():
    split = config["splits"]
    return list(range(split["k"])) if split["mode"] == "kfold" else [0]


wildcard_constraints:
    slide=ID_PATTERN,
    shard=r"shard\d+",
    task="|".join(TASKS),
    mag="|".join(map(str, MAGNIFICATIONS)),
    fold=r"\d+",
    method=ID_PATTERN,
    family="|".join(FAMILIES),
    encoder="|".join(re.escape(name) for name in ENCODER_SPECS),
    source="|".join(layout.WEIGHTS_SOURCES),
    cohort="|".join(re.escape(name) for name in COHORTS) or "(?!)",  # no cohorts: matches nothing


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def sheet_mpp(wildcards):
    mpp = SAMPLES.loc[wildcards.slide, "mpp"]
    return None if mpp != mpp or mpp is None else float(mpp)  # NaN check


def case_of(wildcards):
    return SAMPLES.loc[wildcards.slide, "case_id"]


def method_spec(wildcards):
    return RESOLVED[wildcards.task][wildcards.method]


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
    return per_unit(layout.PATCH_ROW, layout.SHARD_TABLES["patch"], mag=mags)


def patch_rows(mags):
    """Manifest rows of every slide at ``mags``, per slide or per shard (cached: every training
    job asks for them)."""
    return _patch_rows(tuple(mags))


def qc_records():
    return per_unit(layout.QC_RECORD, layout.SHARD_TABLES["qc"])


def thumbs():
    """Per-slide QC thumbnails (per-slide jobs only: shards list them in their tissue tables)."""
    return [] if SHARDS else expand(layout.TISSUE_THUMB, slide=SLIDES)


def tissue_tables():
    return expand(layout.SHARD_TABLES["tissue"], shard=SHARDS)


def shard_column(column, missing=None):
    """A sample-sheet column for the slides of a shard, as a plain list (a params value)."""

    def values(wildcards):
        col = SAMPLES.loc[SHARDS[wildcards.shard], column]
        return [missing if v is None or v != v else v for v in col]  # v != v: NaN

    return values


def shard_runtime(rule_name):
    """A shard job's time limit: the per-slide minutes of its step times its slides."""
    return lambda wildcards: MINUTES_PER_SLIDE[rule_name] * len(SHARDS[wildcards.shard])


def fallback_mags(wildcards):
    """The feature magnification and the coarser ones it may fall back to (not finer ones:
    adding 40x must not redo 20x features)."""
    return [m for m in MAGS if m <= int(wildcards.mag)]


def run_files(task, name):
    """File ``name`` (e2epath.layout.RUN_FILES) of every training run of ``task``."""
    return [layout.run_file(name, FAMILY[m], task, m, k) for m in RESOLVED[task] for k in folds()]


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
    return "imagenet" if wildcards.source == "imagenet" else ENCODER_SPECS[wildcards.encoder]["weights"]


def feature_encoder_json(wildcards):
    """The encoder's preset as a plain value: changing it reruns only its feature jobs."""
    return json.dumps(job_encoder_spec(FEATURE_ENCODERS[wildcards.encoder]), sort_keys=True)


def feature_weights(wildcards):
    return str(FEATURE_ENCODERS[wildcards.encoder]["weights"])  # "None": random init


def feature_memory(wildcards, attempt):
    """A feature job's memory: a foundation model's checkpoint is gigabytes (ViT-g: 4.5 GB in fp32)."""
    return (16000 if FEATURE_ENCODERS[wildcards.encoder]["foundation"] else 8000) * attempt


def feature_pretrained(wildcards):
    return weights_input(FEATURE_ENCODERS[wildcards.encoder]["weights"], wildcards.encoder)


def method_features(wildcards):
    """The feature files (or shard tables) of a two-stage method's encoder."""
    spec = method_spec(wildcards)
    return per_unit(layout.FEATURES, layout.SHARD_TABLES["features"], encoder=spec["encoder"],
                    mag=config["twostage"]["magnification"])


# ------------------------------------------------------------------ external cohorts


def cohort_sheet(wildcards):
    return COHORTS[wildcards.cohort]


def cohort_slide_path(wildcards):
    return cohort_sheet(wildcards).loc[wildcards.slide, "path"]


def cohort_sheet_mpp(wildcards):
    mpp = cohort_sheet(wildcards).loc[wildcards.slide, "mpp"]
    return None if mpp != mpp or mpp is None else float(mpp)  # NaN check


def cohort_case_of(wildcards):
    return cohort_sheet(wildcards).loc[wildcards.slide, "case_id"]


def cohort_items(pattern, cohort, **wildcards):
    """A per-slide pattern of the training cohort → that file of every slide of external ``cohort``."""
    return expand(layout.in_cohort(pattern, cohort), slide=COHORTS[cohort].index, **wildcards)


def cohort_labels(cohort, task):
    """The cohort's label table of ``task``, or None (predicted, not scored)."""
    return (config["cohorts"][cohort].get("labels") or {}).get(task)


def labelled_cohorts(task):
    return [c for c in COHORTS if cohort_labels(c, task)]


def method_models(wildcards):
    """The fold models of a method (every fold predicts an external cohort)."""
    m = wildcards.method
    return [layout.run_file("model", FAMILY[m], wildcards.task, m, k) for k in folds()]


def cohort_inputs(wildcards):
    """What a method reads of a cohort: E2E the patch rows at its evaluation magnification; two-stage
    the cohort's features of its encoder."""
    spec = method_spec(wildcards)
    if spec["family"] == "e2e":
        return cohort_items(layout.PATCH_ROW, wildcards.cohort, mag=spec["eval_magnification"])
    return cohort_items(layout.FEATURES, wildcards.cohort, encoder=spec["encoder"],
                        mag=config["twostage"]["magnification"])


def cohort_predictions(task, name="record"):
    """File ``name`` (layout.COHORT_FILES) of every method's predictions of every cohort labelled
    for ``task`` (what its evaluation reads)."""
    return [layout.cohort_file(name, c, task, m) for c in labelled_cohorts(task) for m in RESOLVED[task]]


def map_methods(task):
    """Methods whose attention is worth a map (mean pooling's is uniform)."""
    return [m for m, spec in RESOLVED[task].items() if spec["aggregator"] != "mean"]


def all_outputs():
    outs = [layout.QC_TABLE, layout.MANIFEST]
    for pattern in (layout.SPLITS, layout.METRICS, layout.TABLE_MD, layout.TASK_FIGURES):
        outs += expand(pattern, task=TASKS)
    outs += [layout.COHORT_FIGURES]
    outs += predict_outputs()
    if config["maps"]["enabled"]:
        outs += [layout.MAPS.format(task=t, method=m) for t in TASKS for m in map_methods(t)]
    return outs


def predict_outputs():
    """Every method's predictions of every external cohort (the `predict` target), their maps and
    each cohort's QC figures."""
    outs = []
    for cohort in COHORTS:
        outs.append(layout.in_cohort(layout.COHORT_FIGURES, cohort))
        for task in TASKS:
            outs += [layout.cohort_file("ensemble", cohort, task, m) for m in RESOLVED[task]]
            if config["maps"]["enabled"]:
                outs += [layout.in_cohort(layout.MAPS, cohort).format(task=task, method=m) for m in map_methods(task)]
    return outs
