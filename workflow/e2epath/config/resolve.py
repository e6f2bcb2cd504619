"""The resolved config: everything the workflow computes or checks about a config, in one object.

`resolve` takes a config validated against the schema (defaults filled in: `e2epath.core.schema`)
and returns a `Plan` — the cohorts with their sample sheets and shards, the methods of every task
with their resolved hyper-parameters, the encoders, the magnifications each cohort is patched at,
what a model file records of the preprocessing, the folds — or raises a ConfigError whose message
names the key, file or row and what to do. The Snakefile (`workflow/rules/common.smk`) only reads
the plan; `python -m e2epath check --config` builds the same plan, and `python -m e2epath methods
--config` its config-level part (`resolve_methods`: no sample sheet is read), so both refuse what
the workflow refuses, with the same message.

Relative paths in the config (sample sheets, label tables) are relative to the run directory:
the current directory, as for Snakemake.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from e2epath.core import layout
from e2epath.core.schema import SCHEMA_PATH, ConfigError
from e2epath.core.vocabulary import INTERNAL
from e2epath.models.presets import EncoderError, resolve_encoders
from e2epath.preprocess import shards
from e2epath.sources import sheets
from e2epath.train import recipe

# Above this many slides, one job per slide and step makes Snakemake plan for minutes: suggest shards.
SHARDS_ADVISED_ABOVE = 3000
SLIDES_PER_SHARD = 20
# What a model file does not record of the preprocess section: the magnification list and the
# sharding (adding 40x or shards reruns no training).
NOT_RECORDED = ("magnifications", "shards")


@dataclass(frozen=True)
class Demo:
    """A synthetic cohort the demo writes where a sample sheet is missing (`demo_cohort` rules)."""

    rule: str         # the rule that writes it
    sheet: str        # its sample sheet (the config's path)
    n_slides: int
    seed: int
    scale: float
    external: bool    # "another scanner" (an external cohort) or the training cohort

    @property
    def folder(self) -> str:
        return str(Path(self.sheet).parent)

    @property
    def labels(self) -> list[str]:
        """The label tables it writes (`python -m e2epath demo`)."""
        return [f"{self.folder}/labels/{name}.csv" for name in ("subtype", "survival")]


@dataclass(frozen=True)
class Cohort:
    """The training cohort (`INTERNAL`) or an external one: its sample sheet (indexed by slide id;
    paths absolute), the tasks it has labels for, and its shards (empty: one job per slide)."""

    name: str
    sheet: pd.DataFrame
    labels: dict[str, str]
    shards: dict[str, list[str]] = field(default_factory=dict)
    demo: Demo | None = None

    @property
    def slides(self) -> list[str]:
        return list(self.sheet.index)

    @property
    def external(self) -> bool:
        return self.name != INTERNAL

    def path(self, pattern: str) -> str:
        """A results pattern of the training cohort → this cohort's (`layout.in_cohort`)."""
        return layout.in_cohort(pattern, self.name) if self.external else pattern


@dataclass(frozen=True)
class Methods:
    """The config-level part of the plan: what `python -m e2epath methods` prints and checks."""

    methods: dict[str, dict[str, dict[str, Any]]]  # task → method → its jobs' hyper-parameters
    encoders: dict[str, dict[str, Any]]            # every encoder a job may name (presets and the config's)
    feature_encoders: dict[str, dict[str, Any]]    # twostage.encoders as their features are extracted
    magnifications: list[int]                      # what the training cohort is patched at
    cohort_magnifications: list[int]               # what external cohorts are patched at
    preprocess: dict[str, Any]                     # what a model file records of the preprocessing

    @property
    def families(self) -> dict[str, str]:
        return {name: spec["family"] for specs in self.methods.values() for name, spec in specs.items()}


@dataclass(frozen=True)
class Plan:
    """Everything the workflow needs to know about a config."""

    config: dict[str, Any]
    methods: Methods
    training: Cohort
    cohorts: dict[str, Cohort]          # the external ones, by name
    warnings: tuple[str, ...] = ()

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.config["tasks"]

    @property
    def folds(self) -> list[int]:
        split = self.config["splits"]
        return list(range(split["k"])) if split["mode"] == "kfold" else [0]

    @property
    def demos(self) -> list[Demo]:
        return [c.demo for c in (self.training, *self.cohorts.values()) if c.demo is not None]

    def cohort(self, name: str | None = None) -> Cohort:
        """The training cohort (no name), or external cohort ``name``."""
        return self.training if name is None else self.cohorts[name]


def resolve_methods(config: dict[str, Any]) -> Methods:
    """The config-level plan (no file is read): every task × method's hyper-parameters, the
    encoders, and the magnifications; ConfigError for what the workflow refuses."""
    methods = recipe.resolve(config)
    feature_encoders = recipe.feature_encoders(config)
    try:
        encoders = resolve_encoders(config)
    except EncoderError as err:
        raise ConfigError(str(err)) from err
    prep = config["preprocess"]
    mags = prep["magnifications"]
    for task, specs in methods.items():
        for name, spec in specs.items():
            missing = sorted(set(recipe.magnifications_used(spec)) - set(mags))
            if missing:
                raise ConfigError(f"config: method {name!r} reads {missing}x patches for task {task!r} (its sampling "
                                  f"and evaluation magnifications) but preprocess.magnifications is {mags}; add "
                                  "them there, or set the method's sampling")
    # External cohorts are patched at the magnifications the methods predict from: E2E the
    # evaluation one; two-stage the feature one and the coarser ones its features may fall back to.
    specs = [spec for task_specs in methods.values() for spec in task_specs.values()]
    cohort_mags = {s["eval_magnification"] for s in specs if s["family"] == "e2e"}
    if any(s["family"] == "twostage" for s in specs):
        cohort_mags |= {m for m in mags if m <= config["twostage"]["magnification"]}
    preprocess = {k: v for k, v in prep.items() if k not in NOT_RECORDED}
    return Methods(methods, encoders, feature_encoders, list(mags), sorted(cohort_mags), preprocess)


def _demo_sheet(demo: Demo) -> pd.DataFrame:
    from e2epath.sources import demo as writer

    planned = (writer.plan_external if demo.external else writer.plan)(demo.n_slides, demo.seed)
    # absolute, as load_samples gives them: the next run reads the written sheet, same inputs
    planned["path"] = [str((Path(demo.sheet).parent / p).resolve()) for p in planned["path"]]
    return planned


def _shards(slides: list[str], n_shards: int) -> dict[str, list[str]]:
    return shards.assign(slides, n_shards) if n_shards else {}


def _training(config: dict[str, Any]) -> Cohort:
    labels = {task: spec["labels"] for task, spec in config["tasks"].items()}
    demo = None
    if config["demo"]["enabled"] and not Path(config["samples"]).exists():
        d = config["demo"]
        demo = Demo("demo_cohort", config["samples"], d["n_slides"], d["seed"], d["scale"], external=False)
        sheet = _demo_sheet(demo)
    else:
        try:
            sheet = sheets.validate_all(config)
        except sheets.SheetError as err:
            raise ConfigError(str(err)) from err
    sheet = sheet.set_index("slide_id", drop=False)
    return Cohort(INTERNAL, sheet, labels, _shards(list(sheet.index), config["preprocess"]["shards"]), demo)


def _external(config: dict[str, Any], name: str, spec: dict[str, Any], training: Cohort) -> tuple[Cohort, list[str]]:
    warnings = []
    demo = None
    if config["demo"]["enabled"] and spec.get("demo") is not None and not Path(spec["samples"]).exists():
        demo = Demo(f"demo_cohort_{name}", spec["samples"], spec["demo"]["n_slides"], spec["demo"]["seed"],
                    config["demo"]["scale"], external=True)
        sheet = _demo_sheet(demo)
    else:
        try:
            sheet = sheets.validate_cohort(name, spec, config["tasks"])
        except sheets.SheetError as err:
            raise ConfigError(str(err)) from err
        shared = sorted(set(sheet["case_id"]) & set(training.sheet["case_id"]))
        if shared:
            warnings.append(f"cohort {name}: {len(shared)} case id(s) also in the training cohort "
                            f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}): if they are the same "
                            "patients, this is not an external validation")
    sheet = sheet.set_index("slide_id", drop=False)
    cohort = Cohort(name, sheet, dict(spec.get("labels") or {}),
                    _shards(list(sheet.index), config["preprocess"]["shards"]), demo)
    return cohort, warnings


def resolve(config: dict[str, Any]) -> Plan:
    """The plan of a schema-validated config (sample sheets and label tables read and checked);
    ConfigError naming what to fix."""
    methods = resolve_methods(config)
    training = _training(config)
    cohorts, warnings = {}, []
    for name, spec in config["cohorts"].items():
        cohorts[name], found = _external(config, name, spec, training)
        warnings += found
    if not training.shards and len(training.slides) > SHARDS_ADVISED_ABOVE:
        warnings.append(f"{len(training.slides)} slides with one job per slide and step: Snakemake needs minutes to "
                        f"plan each run; set preprocess.shards to about {len(training.slides) // SLIDES_PER_SHARD} "
                        "(config/README.md)")
    return Plan(config, methods, training, cohorts, tuple(warnings))


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against the schema and fill its defaults in (in place, and returned);
    the error is Snakemake's (a WorkflowError naming the key), as the workflow shows it."""
    from snakemake.utils import validate as snakemake_validate

    snakemake_validate(config, str(SCHEMA_PATH))
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """A config file validated against the schema, defaults filled in: what the workflow sees."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys (config/README.md)")
    try:
        return validate(config)
    except Exception as err:  # noqa: BLE001 - snakemake's WorkflowError: the same words as the workflow's
        raise ConfigError(str(err)) from err


def preprocess_json(plan: Plan) -> str:
    """What a model file records of the preprocessing, as a plain value (a rule's param)."""
    return json.dumps(plan.methods.preprocess, sort_keys=True)
