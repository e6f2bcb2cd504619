"""`python -m e2epath import`: public cohorts' downloads → a sample sheet and label tables the
workflow accepts (GDC manifest + clinical TSV, PANDA, CAMELYON16/17)."""
from __future__ import annotations

import logging
import subprocess
import sys

import pandas as pd
import pytest

from e2epath.sources.importers import cli
from e2epath.sources.sheets import load_labels, load_samples
from helpers import ROOT

# name → (file id, case, clinical rows: (vital_status, days_to_death, days_to_last_follow_up, diagnosis))
SLIDES = {
    "TCGA-AA-0001-01Z-00-DX1.ABC": ("f1", "TCGA-AA-0001"),
    "TCGA-AA-0001-01Z-00-DX2.DEF": ("f2", "TCGA-AA-0001"),
    "TCGA-AA-0002-01Z-00-DX1.GHI": ("f3", "TCGA-AA-0002"),
    "TCGA-AA-0002-01A-01-TS1.JKL": ("f4", "TCGA-AA-0002"),   # frozen section: left out
    "TCGA-AA-0003-01Z-00-DX1.MNO": ("f5", "TCGA-AA-0003"),   # unmapped diagnosis: left out
    "TCGA-AA-0004-01Z-00-DX1.PQR": ("f6", "TCGA-AA-0004"),   # not downloaded
}
CLINICAL = [  # one row per case and treatment, as the GDC export; the 2024+ column names
    ("TCGA-AA-0001", "TCGA-BRCA", "Dead", "400", "'--", "Infiltrating duct carcinoma, NOS"),
    ("TCGA-AA-0001", "TCGA-BRCA", "Dead", "400", "'--", "Infiltrating duct carcinoma, NOS"),
    ("TCGA-AA-0002", "TCGA-BRCA", "Alive", "'--", "1200", "Lobular carcinoma, NOS"),
    ("TCGA-AA-0002", "TCGA-BRCA", "Alive", "'--", "1500", "Lobular carcinoma, NOS"),
    ("TCGA-AA-0003", "TCGA-BRCA", "Alive", "'--", "90", "Mucinous adenocarcinoma"),
    ("TCGA-AA-0004", "TCGA-BRCA", "Alive", "'--", "30", "Lobular carcinoma, NOS"),
]
MAP = ["--map", "Infiltrating duct carcinoma, NOS=IDC", "--map", "Lobular carcinoma, NOS=ILC"]


def gdc_download(root, new_columns: bool = True):
    manifest = root / "manifest.txt"
    rows = [{"id": fid, "filename": f"{name}.svs", "md5": "0" * 32, "size": 1, "state": "released"}
            for name, (fid, _) in SLIDES.items()]
    rows.append({"id": "f9", "filename": "clinical.xml", "md5": "0" * 32, "size": 1, "state": "released"})
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    for name, (fid, case) in SLIDES.items():
        if case != "TCGA-AA-0004":
            (root / "dl" / fid).mkdir(parents=True, exist_ok=True)
            (root / "dl" / fid / f"{name}.svs").write_bytes(b"slide")
    cols = (["cases.submitter_id", "project.project_id", "demographic.vital_status", "demographic.days_to_death",
             "diagnoses.days_to_last_follow_up", "diagnoses.primary_diagnosis"] if new_columns else
            ["case_submitter_id", "project_id", "vital_status", "days_to_death", "days_to_last_follow_up",
             "primary_diagnosis"])
    pd.DataFrame(CLINICAL, columns=cols).to_csv(root / "clinical.tsv", sep="\t", index=False)
    return manifest


@pytest.mark.parametrize("new_columns", [True, False])
def test_gdc_manifest_and_clinical_table_become_a_sheet_and_labels(tmp_path, caplog, new_columns):
    manifest = gdc_download(tmp_path, new_columns)
    out = tmp_path / "run"
    argv = ["gdc", "--manifest", str(manifest), "--slides", str(tmp_path / "dl"), "--clinical",
            str(tmp_path / "clinical.tsv"), "--out", str(out), "--label", "subtype=primary_diagnosis", *MAP,
            "--survival", "survival"]
    assert cli(argv) == 2  # one slide is not downloaded: an error naming it, nothing written
    assert not (out / "slides.tsv").exists()
    with caplog.at_level(logging.INFO, logger="e2epath.sources.importers"):
        assert cli([*argv, "--skip-missing"]) == 0
    sheet = pd.read_csv(out / "slides.tsv", sep="\t")
    assert sheet.to_dict("records") == [
        {"slide_id": "TCGA-AA-0001-01Z-00-DX1.ABC", "path": "../dl/f1/TCGA-AA-0001-01Z-00-DX1.ABC.svs",
         "case_id": "TCGA-AA-0001"},
        {"slide_id": "TCGA-AA-0001-01Z-00-DX2.DEF", "path": "../dl/f2/TCGA-AA-0001-01Z-00-DX2.DEF.svs",
         "case_id": "TCGA-AA-0001"},
        {"slide_id": "TCGA-AA-0002-01Z-00-DX1.GHI", "path": "../dl/f3/TCGA-AA-0002-01Z-00-DX1.GHI.svs",
         "case_id": "TCGA-AA-0002"}]
    subtype = pd.read_csv(out / "labels/subtype.csv")
    assert subtype.to_dict("records") == [{"case_id": "TCGA-AA-0001", "label": "IDC"},
                                          {"case_id": "TCGA-AA-0002", "label": "ILC"}]
    survival = pd.read_csv(out / "labels/survival.csv")
    assert survival.to_dict("records") == [{"case_id": "TCGA-AA-0001", "time": 400.0, "event": 1},
                                           {"case_id": "TCGA-AA-0002", "time": 1500.0, "event": 0}]
    cases = set(load_samples(out / "slides.tsv")["case_id"])  # the workflow accepts them
    load_labels(out / "labels/subtype.csv", "subtype", "classification", cases)
    assert "Mucinous adenocarcinoma" in caplog.text and "non-diagnostic" in caplog.text
    assert "TCGA-AA-0004" in caplog.text or "not in" in caplog.text


def test_gdc_errors_name_what_to_fix(tmp_path, capsys):
    manifest = gdc_download(tmp_path)
    base = ["gdc", "--manifest", str(manifest), "--slides", str(tmp_path / "dl"), "--clinical",
            str(tmp_path / "clinical.tsv"), "--out", str(tmp_path / "run"), "--skip-missing"]
    assert cli([*base, "--label", "subtype=histology", *MAP]) == 2
    assert "no column 'histology'" in capsys.readouterr().err
    assert cli([*base, "--label", "subtype=primary_diagnosis", "--map", "Ductal=IDC"]) == 2
    assert "no case has a primary_diagnosis value in the --map" in capsys.readouterr().err
    assert cli(base) == 2
    assert "--label TASK=FIELD" in capsys.readouterr().err
    assert cli([*base, "--survival", "os", "--case-pattern", r"^(C3[LN]-\d{5})"]) == 2
    assert "--case-pattern" in capsys.readouterr().err


def test_panda_and_camelyon(tmp_path):
    images = tmp_path / "train_images"
    images.mkdir()
    for image in ("aa11", "bb22", "cc33"):
        (images / f"{image}.tiff").write_bytes(b"x")
    pd.DataFrame({"image_id": ["aa11", "bb22", "cc33"], "data_provider": ["radboud", "karolinska", "radboud"],
                  "isup_grade": [0, 5, 3], "gleason_score": ["0+0", "5+5", "4+3"]}).to_csv(tmp_path / "train.csv",
                                                                                            index=False)
    assert cli(["panda", "--csv", str(tmp_path / "train.csv"), "--images", str(images), "--out",
                str(tmp_path / "panda")]) == 0
    sheet = load_samples(tmp_path / "panda/slides.tsv")
    assert list(sheet["slide_id"]) == list(sheet["case_id"]) == ["aa11", "bb22", "cc33"]
    grades = load_labels(tmp_path / "panda/labels/isup.csv", "isup", "grading", set(sheet["case_id"]))
    assert dict(zip(grades["case_id"], grades["label"])) == {"aa11": "0", "bb22": "5", "cc33": "3"}

    c16, c17 = tmp_path / "c16", tmp_path / "c17"
    for rel in ("training/normal/normal_001.tif", "training/tumor/tumor_001.tif", "testing/images/test_001.tif",
                "testing/images/test_002.tif"):
        (c16 / rel).parent.mkdir(parents=True, exist_ok=True)
        (c16 / rel).write_bytes(b"x")
    (c16 / "testing/reference.csv").write_text("test_001,Tumor,Macro,Metastases\ntest_002,Normal\n")
    for rel in ("training/center_0/patient_000_node_0.tif", "training/center_0/patient_000_node_1.tif"):
        (c17 / rel).parent.mkdir(parents=True, exist_ok=True)
        (c17 / rel).write_bytes(b"x")
    (c17 / "stage_labels.csv").write_text("patient,stage\npatient_000.zip,pN1mi\npatient_000_node_0.tif,itc\n"
                                          "patient_000_node_1.tif,micro\n")
    assert cli(["camelyon", "--c16", str(c16), "--c17", str(c17), "--out", str(tmp_path / "cam")]) == 0
    labels = pd.read_csv(tmp_path / "cam/labels/metastasis.csv").set_index("case_id")["label"].to_dict()
    assert labels == {"normal_001": "negative", "tumor_001": "positive", "test_001": "positive",
                      "test_002": "negative", "patient_000_node_0": "negative", "patient_000_node_1": "positive"}


def test_cohort_is_a_step():
    res = subprocess.run([sys.executable, "-m", "e2epath", "import", "gdc", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0 and "--manifest" in res.stdout and "--case-pattern" in res.stdout
