"""Sample sheets and label tables from what public cohorts ship: `python -m e2epath import <source>`.

* ``gdc`` — TCGA / CPTAC from the Genomic Data Commons: a GDC manifest (the slides downloaded
  with `gdc-client download -m manifest.txt -d DIR`, one folder per file id) and the cases'
  clinical table (the GDC cart's "Clinical: TSV", `clinical.tsv`; old and new column names both
  work). Class labels come from a clinical field mapped to class names (`--label
  subtype=primary_diagnosis --map "Lobular carcinoma, NOS=ILC" ...`); survival labels (`--survival
  TASK`) from vital status, days to death and days to last follow-up.
* ``panda`` — the PANDA challenge's `train.csv` and `train_images/`: ISUP grade per biopsy.
* ``camelyon`` — CAMELYON16 (`training/normal`, `training/tumor`, `testing/images` +
  `testing/reference.csv`) and / or CAMELYON17 (`training/center_*` + `stage_labels.csv`):
  metastasis (`positive`) or not (`negative`) per slide.

Each writes `OUT/slides.tsv` (paths relative to OUT where they can be) and `OUT/labels/{task}.csv`,
keeps only cases labelled in every task it writes (e2epath requires it), says how many cases each
rule dropped and why, and checks the result with the same code the workflow uses
(`sheets.load_samples` / `sheets.load_labels`). Files are written under a temporary name and
renamed when complete. Nothing is downloaded here.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import pandas as pd

from e2epath.core.io import atomic_path
from e2epath.core.vocabulary import ID_RE, ID_RULE
from e2epath.sources.sheets import SHEET_REQUIRED, label_columns, load_labels, load_samples

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")
TCGA_CASE = r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})"
MISSING = {"", "'--", "--", "not reported", "unknown", "nan", "na", "n/a"}


class ImporterError(ValueError):
    """Input that cannot become a sheet; the message names the file, row or value and the fix."""


# ------------------------------------------------------------------ writing

def _relative(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def write_sheet(out: Path, slides: pd.DataFrame, labels: dict[str, tuple[str, pd.DataFrame]]) -> dict[str, Path]:
    """Keep the cases labelled in every task, write the sheet and the label tables, check them.

    ``slides``: slide_id, path (absolute), case_id; ``labels``: task → (task type, table by case).
    """
    out.mkdir(parents=True, exist_ok=True)
    keep = set(slides["case_id"])
    for task, (_, table) in labels.items():
        missing = keep - set(table["case_id"])
        if missing:
            logger.warning("%d case(s) have slides but no %s label and are left out, e.g. %s", len(missing), task,
                           ", ".join(sorted(missing)[:5]))
        keep &= set(table["case_id"])
    if not keep:
        raise ImporterError("no case has both slides and every label: check that the manifest, the slide folder "
                          "and the clinical table describe the same cases")
    sheet = slides[slides["case_id"].isin(keep)].sort_values(["case_id", "slide_id"]).copy()
    sheet["path"] = [_relative(Path(p), out) for p in sheet["path"]]
    written = {"samples": out / "slides.tsv"}
    with atomic_path(written["samples"]) as tmp:
        sheet[list(SHEET_REQUIRED)].to_csv(tmp, sep="\t", index=False)
    for task, (_, table) in labels.items():
        written[task] = out / "labels" / f"{task}.csv"
        written[task].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(written[task]) as tmp:
            table[table["case_id"].isin(keep)].sort_values("case_id").to_csv(tmp, index=False)
    # the workflow's own checks, so a sheet written here is one the workflow accepts
    cases = set(load_samples(written["samples"])["case_id"])
    for task, (task_type, _) in labels.items():
        load_labels(written[task], task, task_type, cases)
    logger.info("wrote %s: %d slides of %d cases; labels: %s", written["samples"], len(sheet), len(keep),
                ", ".join(str(written[t]) for t in labels))
    return written


def _check_slide_ids(slides: pd.DataFrame, source: str) -> None:
    bad = [s for s in slides["slide_id"] if not ID_RE.match(s)]
    if bad:
        raise ImporterError(f"{source}: slide name(s) {bad[:3]} cannot be slide ids ({ID_RULE}); rename the files")
    dup = slides["slide_id"][slides["slide_id"].duplicated()].tolist()
    if dup:
        raise ImporterError(f"{source}: slide id(s) {dup[:3]} occur more than once; keep one copy of each file")


# ------------------------------------------------------------------ GDC (TCGA, CPTAC)

def read_manifest(path: Path) -> pd.DataFrame:
    """A GDC manifest: tab-separated `id, filename, md5, size, state`."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str)
    except (OSError, pd.errors.ParserError) as err:
        raise ImporterError(f"{path}: not a readable GDC manifest ({err})") from err
    missing = {"id", "filename"} - set(df.columns)
    if missing:
        raise ImporterError(f"{path}: a GDC manifest has columns id, filename, md5, size, state; "
                          f"missing {sorted(missing)}")
    return df


def locate(slide_dir: Path, file_id: str, filename: str) -> Path | None:
    """Where gdc-client put a file (`DIR/<id>/<filename>`), or `DIR/<filename>` when flattened."""
    for candidate in (slide_dir / file_id / filename, slide_dir / filename):
        if candidate.is_file():
            return candidate
    return None


def gdc_slides(manifest: Path, slide_dir: Path, case_pattern: str, all_slides: bool,
               skip_missing: bool) -> pd.DataFrame:
    """slide_id, path, case_id of the manifest's slide files."""
    df = read_manifest(manifest)
    pattern = re.compile(case_pattern)
    rows, missing, unmatched, frozen = [], [], [], 0
    for r, (file_id, filename) in enumerate(zip(df["id"], df["filename"]), start=2):
        name = Path(str(filename))
        if name.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        m = pattern.match(name.name)
        if not m:
            unmatched.append(f"row {r}: {name.name}")
            continue
        if not all_slides and not re.search(r"-DX[0-9A-Z]*\b", name.stem):
            frozen += 1  # TCGA tissue / frozen-section slides (TS, BS, MS): not diagnostic
            continue
        path = locate(slide_dir, str(file_id), name.name)
        if path is None:
            missing.append(f"{slide_dir / str(file_id) / name.name}")
            continue
        rows.append({"slide_id": name.stem, "path": str(path.resolve()), "case_id": m.group(1)})
    if unmatched:
        raise ImporterError(f"{manifest}: {len(unmatched)} file name(s) do not start with a case id matching "
                          f"{case_pattern!r} ({'; '.join(unmatched[:3])}); give --case-pattern, e.g. "
                          r"'^(C3[LN]-\d{5})' for CPTAC")
    if frozen:
        logger.info("%d non-diagnostic slide(s) (no -DX in the name: frozen / tissue sections) left out; "
                    "--all-slides keeps them", frozen)
    if missing:
        msg = (f"{len(missing)} slide(s) of {manifest} are not in {slide_dir}, e.g. {missing[0]}; finish the "
               "download (gdc-client download -m MANIFEST -d DIR)")
        if not skip_missing:
            raise ImporterError(msg + ", or pass --skip-missing to write the others")
        logger.warning("%s; left out (--skip-missing)", msg)
    if not rows:
        raise ImporterError(f"{manifest}: no slide left (left out: {frozen} non-diagnostic, {len(missing)} missing)"
                          + ("; TCGA diagnostic slides have -DX in their names, other cohorts need --all-slides"
                             if frozen else ""))
    slides = pd.DataFrame(rows)
    _check_slide_ids(slides, str(manifest))
    return slides


def _column(df: pd.DataFrame, names: tuple[str, ...], path: Path, what: str) -> str:
    for name in names:
        if name in df.columns:
            return name
    raise ImporterError(f"{path}: no {what} column ({' or '.join(names)}); use the GDC cart's 'Clinical: TSV' "
                      "(clinical.tsv)")


def read_clinical(path: Path) -> pd.DataFrame:
    """The GDC clinical table, one row per case and diagnosis / treatment; the column names of the
    2024+ GDC export (`cases.submitter_id`, `demographic.vital_status`, …) are shortened to the
    older ones (`case_submitter_id`, `vital_status`, …)."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as err:
        raise ImporterError(f"{path}: not a readable clinical TSV ({err})") from err
    renamed = {}
    for col in df.columns:
        short = col.split(".", 1)[1] if "." in col else col
        if col == "cases.submitter_id":
            short = "case_submitter_id"
        renamed.setdefault(short, col)
    df = df[[renamed[k] for k in renamed]].set_axis(list(renamed), axis=1)
    case = _column(df, ("case_submitter_id", "submitter_id"), path, "case id")
    return df.rename(columns={case: "case_id"})


def _present(value: str) -> bool:
    return str(value).strip().lower() not in MISSING


def class_labels(clinical: pd.DataFrame, field: str, mapping: dict[str, str], path: Path) -> pd.DataFrame:
    """case_id, label from a clinical field, through ``mapping`` (field value → class); values the
    mapping lacks and cases with conflicting values are dropped, with counts."""
    if field not in clinical.columns:
        raise ImporterError(f"{path}: no column {field!r}; columns: {', '.join(clinical.columns[:30])}")
    values = clinical[["case_id", field]].drop_duplicates()
    values = values[values[field].map(_present)]
    out, conflicting, unmapped = [], [], {}
    for case, group in values.groupby("case_id"):
        classes = {mapping.get(v) for v in group[field]} if mapping else set(group[field])
        if None in classes:
            for v in group[field]:
                if v not in mapping:
                    unmapped[v] = unmapped.get(v, 0) + 1
            classes.discard(None)
        if len(classes) > 1:
            conflicting.append(case)
        elif classes:
            out.append({"case_id": case, "label": classes.pop()})
    if unmapped:
        logger.info("%s values without a --map entry (their cases are left out): %s", field,
                    "; ".join(f"{v!r} ({n})" for v, n in sorted(unmapped.items(), key=lambda x: -x[1])[:10]))
    if conflicting:
        logger.warning("%d case(s) with conflicting %s values left out, e.g. %s", len(conflicting), field,
                       ", ".join(conflicting[:5]))
    if not out:
        raise ImporterError(f"{path}: no case has a {field} value in the --map ({', '.join(mapping)}); check the "
                          "spelling against the table's values")
    table = pd.DataFrame(out)
    logger.info("%s: %s", field, table["label"].value_counts().to_dict())
    return table


def survival_labels(clinical: pd.DataFrame, path: Path) -> pd.DataFrame:
    """case_id, time (days), event: the death when `vital_status` is Dead (days_to_death), else
    censored at the last follow-up (the largest of the case's rows)."""
    for col in ("vital_status", "days_to_death", "days_to_last_follow_up"):
        _column(clinical, (col,), path, col)
    out, dropped = [], []
    for case, group in clinical.groupby("case_id"):
        dead = any(v.strip().lower() == "dead" for v in group["vital_status"])
        source = group["days_to_death"] if dead else group["days_to_last_follow_up"]
        days = pd.to_numeric(source[source.map(_present)], errors="coerce").dropna()
        if days.empty or days.max() < 0:
            dropped.append(case)
            continue
        out.append({"case_id": case, "time": float(days.max()), "event": int(dead)})
    if dropped:
        logger.warning("%d case(s) without a usable survival time left out, e.g. %s", len(dropped),
                       ", ".join(dropped[:5]))
    if not out:
        raise ImporterError(f"{path}: no case has a survival time (days_to_death / days_to_last_follow_up)")
    table = pd.DataFrame(out)
    logger.info("survival: %d cases, %d events", len(table), int(table["event"].sum()))
    return table


def _pairs(values: list[str], flag: str, sep: str = "=") -> dict[str, str]:
    out = {}
    for value in values:
        key, eq, target = value.rpartition(sep)
        if not eq or not key or not target:
            raise ImporterError(f"{flag} {value!r}: write KEY{sep}VALUE")
        out[key] = target
    return out


def gdc(a: argparse.Namespace) -> dict[str, Path]:
    slides = gdc_slides(a.manifest, a.slides, a.case_pattern, a.all_slides, a.skip_missing)
    clinical = read_clinical(a.clinical)
    labels: dict[str, tuple[str, pd.DataFrame]] = {}
    mapping = _pairs(a.map, "--map")
    for task, field in _pairs(a.label, "--label").items():
        labels[task] = ("classification", class_labels(clinical, field, mapping, a.clinical))
    if a.survival:
        labels[a.survival] = ("survival", survival_labels(clinical, a.clinical))
    if not labels:
        raise ImporterError("give at least one task: --label TASK=FIELD (with --map VALUE=CLASS) or --survival TASK")
    return write_sheet(a.out, slides, labels)


# ------------------------------------------------------------------ PANDA

def panda(a: argparse.Namespace) -> dict[str, Path]:
    """Each biopsy is its own case (PANDA has one slide per patient biopsy and no patient ids)."""
    table = pd.read_csv(a.csv, dtype=str)
    missing = {"image_id", "isup_grade"} - set(table.columns)
    if missing:
        raise ImporterError(f"{a.csv}: PANDA's train.csv has image_id, data_provider, isup_grade, gleason_score; "
                          f"missing {sorted(missing)}")
    rows, absent = [], []
    for image_id in table["image_id"]:
        path = a.images / f"{image_id}.tiff"
        if path.is_file():
            rows.append({"slide_id": image_id, "path": str(path.resolve()), "case_id": image_id})
        else:
            absent.append(str(path))
    if absent:
        msg = f"{len(absent)} image(s) of {a.csv} are not in {a.images}, e.g. {absent[0]}"
        if not a.skip_missing:
            raise ImporterError(msg + "; finish the download or pass --skip-missing")
        logger.warning("%s; left out (--skip-missing)", msg)
    slides = pd.DataFrame(rows, columns=list(SHEET_REQUIRED))
    _check_slide_ids(slides, str(a.csv))
    labels = table.rename(columns={"image_id": "case_id", "isup_grade": "label"})[list(label_columns("grading"))]
    return write_sheet(a.out, slides, {a.task: ("grading", labels)})


# ------------------------------------------------------------------ CAMELYON

def camelyon16(root: Path) -> list[dict]:
    """normal_*/tumor_* training slides and the test slides labelled by testing/reference.csv."""
    rows = []
    for label, folder in (("negative", "training/normal"), ("positive", "training/tumor")):
        rows += [{"path": p, "label": label} for p in sorted((root / folder).glob("*.tif"))]
    reference = root / "testing" / "reference.csv"
    if (root / "testing" / "images").is_dir():
        if not reference.is_file():
            raise ImporterError(f"{reference} is missing: the CAMELYON16 test slides' labels are in it")
        ref = pd.read_csv(reference, header=None, dtype=str)
        truth = {str(n).removesuffix(".tif"): str(t).strip().lower() for n, t in zip(ref[0], ref[1])}
        for p in sorted((root / "testing" / "images").glob("*.tif")):
            if p.stem not in truth:
                raise ImporterError(f"{reference}: no row for {p.name}")
            rows.append({"path": p, "label": "positive" if truth[p.stem] == "tumor" else "negative"})
    return rows


def camelyon17(root: Path) -> list[dict]:
    """training/center_*/patient_*_node_*.tif labelled by stage_labels.csv (negative / itc / micro /
    macro; isolated tumour cells count as negative, as in the CAMELYON17 pN staging)."""
    labels_csv = root / "stage_labels.csv"
    if not labels_csv.is_file():
        raise ImporterError(f"{labels_csv} is missing: the CAMELYON17 slides' labels are in it")
    stages = pd.read_csv(labels_csv, dtype=str)
    if not {"patient", "stage"} <= set(stages.columns):
        raise ImporterError(f"{labels_csv}: expected columns patient, stage")
    truth = {r.patient.removesuffix(".tif"): r.stage.strip().lower() for r in stages.itertuples()
             if r.patient.endswith(".tif")}
    rows = []
    for p in sorted(root.glob("training/center_*/*.tif")):
        if p.stem not in truth:
            raise ImporterError(f"{labels_csv}: no row for {p.name}")
        rows.append({"path": p, "label": "negative" if truth[p.stem] in ("negative", "itc") else "positive"})
    return rows


def camelyon(a: argparse.Namespace) -> dict[str, Path]:
    """Labels are per slide, so each slide is its own case (CAMELYON17's five nodes of a patient
    are then split independently; docs say so)."""
    rows = (camelyon16(a.c16) if a.c16 else []) + (camelyon17(a.c17) if a.c17 else [])
    if not rows:
        raise ImporterError("no CAMELYON slide found: give --c16 and / or --c17 folders as the challenge ships them")
    slides = pd.DataFrame([{"slide_id": Path(r["path"]).stem, "path": str(Path(r["path"]).resolve()),
                            "case_id": Path(r["path"]).stem} for r in rows])
    _check_slide_ids(slides, "CAMELYON")
    labels = pd.DataFrame({"case_id": slides["case_id"], "label": [r["label"] for r in rows]})
    return write_sheet(a.out, slides, {a.task: ("classification", labels)})


# ------------------------------------------------------------------ command line

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="e2epath import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    g = sub.add_parser("gdc", help="TCGA / CPTAC: GDC manifest + slide folder + clinical.tsv")
    g.add_argument("--manifest", required=True, type=Path, help="the GDC manifest the slides were downloaded with")
    g.add_argument("--slides", required=True, type=Path, help="the folder gdc-client downloaded into")
    g.add_argument("--clinical", required=True, type=Path, help="the cases' clinical.tsv (GDC cart: Clinical: TSV)")
    g.add_argument("--out", required=True, type=Path, help="run folder: slides.tsv and labels/{task}.csv go here")
    g.add_argument("--label", action="append", default=[], metavar="TASK=FIELD",
                   help="a classification task from a clinical field, e.g. subtype=primary_diagnosis")
    g.add_argument("--map", action="append", default=[], metavar="VALUE=CLASS",
                   help="field value → class, e.g. 'Lobular carcinoma, NOS=ILC'; values not mapped are left out")
    g.add_argument("--survival", default=None, metavar="TASK", help="a survival task (days; event = death)")
    g.add_argument("--case-pattern", default=TCGA_CASE,
                   help="regex whose first group is the case id at the start of a file name "
                        f"(default TCGA: {TCGA_CASE})")
    g.add_argument("--all-slides", action="store_true", help="keep frozen / tissue slides too (default: -DX only)")
    g.add_argument("--skip-missing", action="store_true", help="write the slides that are there; warn about the rest")
    p = sub.add_parser("panda", help="PANDA: train.csv + train_images/")
    p.add_argument("--csv", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--task", default="isup")
    p.add_argument("--skip-missing", action="store_true")
    c = sub.add_parser("camelyon", help="CAMELYON16 and / or CAMELYON17 as the challenge ships them")
    c.add_argument("--c16", type=Path, default=None, help="the CAMELYON16 folder (training/, testing/)")
    c.add_argument("--c17", type=Path, default=None, help="the CAMELYON17 folder (training/, stage_labels.csv)")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--task", default="metastasis")
    return ap


def cli(argv: list[str] | None = None) -> int:
    """`python -m e2epath import {gdc,panda,camelyon} ...`."""
    a = parser().parse_args(argv)
    try:
        {"gdc": gdc, "panda": panda, "camelyon": camelyon}[a.source](a)
    except (ImporterError, ValueError, OSError) as err:
        print(f"e2epath import {a.source}: {err}", file=sys.stderr)
        return 2
    return 0
