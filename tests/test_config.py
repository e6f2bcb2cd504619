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
