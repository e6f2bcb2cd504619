"""The words e2epath's config, file names and tables are made of, each written once.

The config schema (`workflow/schemas/config.schema.yaml`) repeats some of them as enums, because a
JSON schema cannot import Python; `tests/test_architecture.py` asserts that the two agree, and the
workflow's wildcard constraints are built from the constants here. Nothing in this module imports
anything: every stage, and the Snakefile at parse time, may ask it.
"""
from __future__ import annotations

import re

# Slide, case, task and method ids become file and folder names.
ID_PATTERN = r"[A-Za-z0-9._-]+"
ID_RE = re.compile(rf"^{ID_PATTERN}$")
ID_RULE = "letters, digits, '.', '_' and '-' (it becomes a file name)"

# Magnifications a slide is patched at; target µm per pixel = 10 / magnification.
MAGNIFICATIONS = (5, 10, 20, 40)

TASK_TYPES = ("classification", "grading", "survival")
# Metrics reported per task type, in table order; the first of each is not necessarily the main one.
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "accuracy", "balanced_accuracy", "macro_f1"),
    "grading": ("auc", "accuracy", "balanced_accuracy", "macro_f1", "qwk"),
    "survival": ("c_index",),
}
# The headline metric of a task type — what the paper reports (AUC for sub-typing, accuracy for
# ISUP grading, C-index): the default model-selection metric (a task's `select_on`), forest plots,
# the reference method.
MAIN_METRIC = {"classification": "auc", "grading": "accuracy", "survival": "c_index"}
METRIC_LABELS = {"auc": "AUC", "accuracy": "Acc.", "balanced_accuracy": "Bal. Acc.", "macro_f1": "Macro F1",
                 "qwk": "QWK", "c_index": "C-index"}

# How a method is trained: end to end (e2e: encoder + aggregator), or an aggregator on frozen
# features (twostage; "two-stage" in tables and figures).
FAMILIES = ("e2e", "twostage")
FAMILY_LABELS = {"e2e": "E2E", "twostage": "two-stage"}

# The metrics a task may select its checkpoints on (`tasks.<task>.select_on`): any metric of any task type.
SELECT_ON = tuple(dict.fromkeys(m for names in METRICS.values() for m in names))

# MIL aggregators a method may name (encoders: e2epath.models.presets, and a config's own).
AGGREGATORS = ("abmilx", "abmil", "abmil_gated", "transmil", "dsmil", "mean")
# What a bag is (`tasks.<task>.bag`): one slide, or a case with all its slides.
BAG_UNITS = ("slide", "case")
# The evaluation input of an E2E method (`eval_crop`): the centre input_size crop of each stored patch,
# or the whole patch resized to input_size.
EVAL_CROPS = ("center", "whole")
# Optimisers a method may name (`optimizer`).
OPTIMIZERS = ("adam", "adamw")
# How cases are split (`splits.mode`): k folds, each tested once, or one train / validation / test split.
SPLIT_MODES = ("kfold", "holdout")


# The training cohort in tables with a `cohort` column (its pooled test folds); config `cohorts:`
# names the external ones, and may not take this name.
INTERNAL = "internal"


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid id, else a ValueError naming ``what`` and the rule."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid id: use only {ID_RULE}")
    return value
