"""Config, sample sheet and label validation: every broken input fails before the first job,
with a message naming the file, the row or key, and what to do."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from e2epath.sources import sheets
from helpers import ROOT, write_sheet_cohort

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def dry_run(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run(SNAKEMAKE + ["-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                                       "--configfile", str(cfg), "-n", "all"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.workflow
def test_valid_cohort_dry_run_lists_jobs(tmp_path):
    res = dry_run(tmp_path, write_sheet_cohort(tmp_path / "in"))
    assert res.returncode == 0, res.stderr
    assert "slide_qc" in res.stdout and "train_e2e" in res.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(unknown_key=1), "unknown_key"),
    (lambda c: c["tasks"]["subtype"].update(typo=1), "typo"),
    (lambda c: c["tasks"]["subtype"].update(type="regression"), "regression"),
    # no validation subset: model selection would have nothing but the test split to look at
    (lambda c: c.update(splits={"mode": "kfold", "k": 3, "val_fraction": 0}), "val_fraction"),
    (lambda c: c.update(splits={"mode": "holdout", "holdout": [0.8, 0.0, 0.2]}), "holdout"),
    (lambda c: c.update(twostage={"encoder": "resnet50"}), "encoder"),
    (lambda c: c["tasks"]["subtype"].update(bag="patient"), "patient"),
])
def test_bad_config_keys_fail_validation(tmp_path, mutate, expected):
    """The Snakefile validates the config against the schema before anything else (common.smk);
    Snakemake's own `validate`, in-process, is what it calls."""
    config = write_sheet_cohort(tmp_path / "in")
    validate(json.loads(json.dumps(config)), SCHEMA)  # the unmodified config is valid
    mutate(config)
    with pytest.raises(WorkflowError) as err:
        validate(config, SCHEMA)
    assert expected in str(err.value)


BROKEN = {
    "duplicate slide id": (dict(rows=[("S1", "slides/S1.svs", "C1"), ("S1", "slides/S2.svs", "C2")]),
                           ["duplicate slide_id 'S1'", "rows 2, 3"]),
    "bad id": (dict(rows=[("S 1/x", "slides/S1.svs", "C1"), ("S2", "slides/S2.svs", "C2")]),
               ["row 2", "'S 1/x'", "rename"]),
    "missing slide file": (dict(rows=[("S1", "slides/S1.svs", "C1"), ("S2", "", "C2")]), ["row 3", "empty path"]),
    "label for unknown case": (dict(subtype="case_id,label\nC1,a\nC2,b\nC9,a\n"), ["subtype.csv", "row 4", "'C9'"]),
    "case without label": (dict(subtype="case_id,label\nC1,a\n"), ["subtype.csv", "'C2'", "no label"]),
    "NaN label": (dict(subtype="case_id,label\nC1,a\nC2,\n"), ["row 3", "empty label"]),
    "negative time": (dict(survival="case_id,time,event\nC1,-1,1\nC2,3,0\n"), ["surv.csv", "row 2", "non-negative"]),
    "bad event": (dict(survival="case_id,time,event\nC1,1,2\nC2,3,0\n"), ["row 2", "event '2'", "0"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_sheets_are_reported_by_validate(tmp_path, case):
    kwargs, expected = BROKEN[case]
    config = write_sheet_cohort(tmp_path, **kwargs)
    with pytest.raises(sheets.SheetError) as err:
        sheets.validate_all(config)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_missing_slide_file_names_path(tmp_path):
    config = write_sheet_cohort(tmp_path)
    (tmp_path / "slides" / "S2.svs").unlink()
    with pytest.raises(sheets.SheetError, match=r"row 3: slide file .*S2.svs of 'S2' does not exist"):
        sheets.validate_all(config)


@pytest.mark.workflow
def test_broken_sheet_fails_snakemake_before_any_job(tmp_path):
    config = write_sheet_cohort(tmp_path / "in", subtype="case_id,label\nC1,a\nC2,b\nC9,a\n")
    res = dry_run(tmp_path, config)
    assert res.returncode != 0
    assert "'C9' has no slide in the sample sheet" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_paths_are_relative_to_the_sheet(tmp_path):
    config = write_sheet_cohort(tmp_path / "deep" / "cohort")
    samples = sheets.validate_all(config)
    assert Path(samples.loc[0, "path"]) == (tmp_path / "deep" / "cohort" / "slides" / "S1.svs").resolve()


def test_sheet_mpp_must_be_positive(tmp_path):
    config = write_sheet_cohort(tmp_path)
    text = (tmp_path / "slides.tsv").read_text().splitlines()
    text = [text[0] + "\tmpp"] + [text[1] + "\t0.25", text[2] + "\t-1", text[3] + "\t"]
    (tmp_path / "slides.tsv").write_text("\n".join(text) + "\n")
    with pytest.raises(sheets.SheetError, match=r"row 3: mpp '-1' of 'S2'"):
        sheets.validate_all(config)


# ------------------------------------------------------------------ one resolved config, three readers
# Each bad config: what is changed on a valid one, and the words the refusal must contain. The
# workflow (`snakemake -n`), `python -m e2epath check --config` and — for what is wrong with the
# config itself rather than with its sample sheets — `python -m e2epath methods --config` refuse it
# with the same message (e2epath.config.resolve is the one place that decides).
def _method(c, **keys):
    c["e2e"]["methods"]["m"].update(keys)


def _twostage(c, **section):
    c["twostage"] = {"encoders": ["resnet18"], "methods": {"t": {"aggregator": "abmil"}}, **section}


BAD_CONFIGS = {
    "unpatched magnification": (lambda c: c.update(preprocess={"magnifications": [10]}),
                                "reads [5]x patches for task 'subtype'", True),
    "ratios that do not sum to 1": (lambda c: _method(c, sampling={"magnifications": [10, 5], "ratios": [0.5, 0.3]}),
                                    "sampling.ratios must sum to 1", True),
    "two-stage encoder not extracted": (lambda c: _twostage(c, methods={"t": {"encoder": "uni", "aggregator": "abmil"}}),
                                        "encoder 'uni' is not in twostage.encoders ['resnet18']", True),
    "foundation model without weights": (lambda c: (_twostage(c, encoders=["uni"]), c.update(encoders={"uni": {"weights": None}})),
                                         "uni is a foundation model", True),
    "oversampled survival": (lambda c: c["tasks"]["surv"].update(oversample=2.0),
                             "oversample is for classification and grading tasks", True),
    "selection metric of another task type": (lambda c: c["tasks"]["subtype"].update(select_on="c_index"),
                                              "select_on 'c_index' is not a classification metric", True),
    "sweep of no method": (lambda c: c.update(sweeps={"grid": {"base": "nope", "grid": {"epochs": [1, 2]}}}),
                           "base method 'nope' is not a method", True),
    "unknown key": (lambda c: c["e2e"]["methods"]["m"].update(epoch=3), "'epoch' was unexpected", True),
    "label of a case without slides": (lambda c: Path(c["tasks"]["subtype"]["labels"]).write_text(
        "case_id,label\nC1,a\nC2,b\nC9,a\n"), "case 'C9' has no slide in the sample sheet", False),
    "cohort labels of no task": (lambda c: c.update(cohorts={"ext": {"samples": c["samples"],
                                                                     "labels": {"grade": c["tasks"]["surv"]["labels"]}}}),
                                 "'grade' is not a task of the config", False),
}


@pytest.mark.workflow
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_refused_alike_by_the_workflow_check_and_methods(tmp_path, case):
    mutate, message, config_level = BAD_CONFIGS[case]
    config = write_sheet_cohort(tmp_path / "in")
    ok = subprocess.run([sys.executable, "-m", "e2epath", "check", "--config", str(_write(tmp_path, config))],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr  # valid before the change: the refusal below is the change's
    mutate(config)
    path = _write(tmp_path, config)
    workflow = dry_run(tmp_path, config)
    assert workflow.returncode != 0 and message in workflow.stdout + workflow.stderr, workflow.stderr[-2000:]
    assert not (tmp_path / "results").exists()
    check = subprocess.run([sys.executable, "-m", "e2epath", "check", "--config", str(path)], capture_output=True,
                           text=True, cwd=tmp_path)
    assert check.returncode == 1 and message in check.stderr, check.stderr
    methods = subprocess.run([sys.executable, "-m", "e2epath", "methods", "--config", str(path)], capture_output=True,
                             text=True, cwd=tmp_path)
    if config_level:
        assert methods.returncode == 2 and message in methods.stderr, methods.stderr
    else:  # the sample sheets and label tables are `check`'s: methods prints a config before its data is there
        assert methods.returncode == 0, methods.stderr


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("step, argv, words", [
    ("patch", ["--patch-size", "16"], "config preprocess.patch_size must be at least 32"),
    ("patch", ["--jpeg-quality", "30"], "config preprocess.jpeg_quality must be at least 50"),
    ("patch", ["--mpp-tolerance", "0.9"], "config preprocess.mpp_tolerance must be at most 0.5"),
    ("tissue", ["--preset", "lung"], "config preprocess.tissue.preset is not one of ['resection', 'biopsy']"),
    ("tissue", ["--sat-floor", "300"], "config preprocess.tissue.sat_floor must be at most 255"),
    ("predict", ["--map-mpp", "1"], "config maps.mpp must be at least 2"),
    ("evaluate", ["--alpha", "1"], "config evaluate.alpha must be below 1"),
])
def test_a_step_refuses_a_setting_the_config_may_not_hold(step, argv, words, capsys):
    """Steps run by hand check their flags against the config schema: a value the workflow would
    refuse is refused by the step too, naming the config key."""
    from e2epath.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([step, *argv])
    assert exit_.value.code == 2 and words in capsys.readouterr().err
