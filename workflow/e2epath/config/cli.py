"""The user's commands on a config: `check` (will the workflow accept it?) and `methods` (what
will every training job receive?). Both resolve the config exactly as the workflow does
(`e2epath.config.resolve`) and refuse what it refuses, with the same message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from e2epath.config.resolve import Plan, load_config, resolve, resolve_methods
from e2epath.core.schema import ConfigError
from e2epath.core.vocabulary import TASK_TYPES
from e2epath.sources import sheets


def _summary(plan: Plan) -> list[str]:
    training = plan.training
    lines = [f"training cohort: {len(training.slides)} slides, {training.sheet['case_id'].nunique()} cases"
             + (" (the demo writes them on the first run)" if training.demo else "")
             + (f", {len(training.shards)} shards" if training.shards else "")]
    for name, cohort in plan.cohorts.items():
        labelled = ", ".join(cohort.labels) or "no labels: predicted, not scored"
        lines.append(f"cohort {name}: {len(cohort.slides)} slides ({labelled})")
    folds = len(plan.folds)
    for task, specs in plan.methods.methods.items():
        lines.append(f"task {task} ({plan.tasks[task]['type']}): {len(specs)} methods × {folds} folds: "
                     + ", ".join(f"{m} ({s['family']})" for m, s in specs.items()))
    lines.append(f"magnifications: {plan.methods.magnifications} (external cohorts: "
                 f"{plan.methods.cohort_magnifications})")
    return lines


def check(argv: list[str] | None = None) -> int:
    """`python -m e2epath check --config FILE [--directory RUN]`: resolve a config as the workflow
    would (schema, sample sheets, label tables, external cohorts, methods) and say what it plans, or
    every problem with the file, row or key to fix; exit 1 when the workflow would refuse it.
    `check --samples SHEET [--labels task:type:path ...]` checks a sample sheet and label tables alone."""
    ap = argparse.ArgumentParser(prog="e2epath check", description=check.__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, help="a config file (config/README.md)")
    what.add_argument("--samples", help=f"a sample sheet (TSV: {sheets.SHEET_HELP})")
    ap.add_argument("--directory", type=Path, default=None,
                    help="the run directory the config's relative paths start from (default: here; as "
                         "snakemake --directory)")
    ap.add_argument("--labels", nargs="*", default=[], help="with --samples: label tables as task:type:path")
    a = ap.parse_args(argv)
    if a.samples:
        tasks = {}
        for spec in a.labels:
            task, task_type, path = spec.split(":", 2)
            if task_type not in TASK_TYPES:
                ap.error(f"--labels {spec}: task type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
            tasks[task] = {"type": task_type, "labels": path}
        try:
            samples = sheets.validate_all({"samples": a.samples, "tasks": tasks})
        except sheets.SheetError as err:
            print(err)
            return 1
        print(f"ok: {len(samples)} slides, {samples['case_id'].nunique()} cases, {len(tasks)} tasks")
        return 0
    config_path = a.config.resolve()
    if a.directory is not None:
        os.chdir(a.directory)
    try:
        plan = resolve(load_config(config_path))
    except (ConfigError, OSError) as err:
        print(f"{a.config}: {err}", file=sys.stderr)
        return 1
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("\n".join([f"ok: {a.config}", *_summary(plan)]))
    return 0


def methods(argv: list[str] | None = None) -> int:
    """`python -m e2epath methods --config FILE [--task T] [--method M]`: the resolved
    hyper-parameters of every task × method, as the training jobs receive them (JSON). The sample
    sheets are not read (`check` reads them): a paper config prints before its data is there."""
    ap = argparse.ArgumentParser(prog="e2epath methods", description=methods.__doc__)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--task", default=None, help="only this task")
    ap.add_argument("--method", default=None, help="only this method")
    a = ap.parse_args(argv)
    try:
        resolved = resolve_methods(load_config(a.config)).methods
    except (ConfigError, OSError) as err:
        print(f"{a.config}: {err}", file=sys.stderr)
        return 2
    out = {t: {m: s for m, s in ms.items() if a.method in (None, m)} for t, ms in resolved.items()
           if a.task in (None, t)}
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0
