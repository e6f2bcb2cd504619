"""External cohorts: the `predict_cohort` step.

`python -m e2epath predict_cohort --task T --cohort C --models M0 M1 ... --slides QC_TABLE
--inputs ROWS_OR_FEATURES... [--labels TABLE] --predictions P0 P1 ... --attention A0 A1 ...
--ensemble E --record R` — every fold model of a method (M0, M1, ... in fold order) predicts every
bag of an external cohort (one per slide or per case: the task's `bag` unit, recorded in the model
file) from the cohort's patch stores (E2E: every patch at the evaluation magnification, exactly as
the test folds were predicted) or its features (two-stage). Per fold model: ``Pk`` with the test
predictions' columns (label columns where the cohort has a label table for the task: empty for the
cases it leaves out) and ``Ak`` in the attention.npz format; ``E``: their ensemble, the mean
probability or risk over the fold models; ``R``: what predicted what (docs/contracts.md "External
cohorts"). A bag without usable patches is left out and named in the log and the record; a label
the models do not know (a class they were not trained on) is an error naming the file and row.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch

from e2epath.core.devices import torch_device
from e2epath.core.io import atomic_path, write_json
from e2epath.data.bags import load_bags
from e2epath.deploy.ensemble import check_members, load_members, mean_scores
from e2epath.features.files import load_feature_bags
from e2epath.sources.sheets import load_labels
from e2epath.train.attention import split_attention, write_attention
from e2epath.train.inference import predict_bag
from e2epath.train.modelfile import ModelFileError
from e2epath.train.tasks import scores

logger = logging.getLogger(__name__)


def label_columns(labels: pd.DataFrame | None, task_type: str, classes: list[str] | None, where: str,
                  case_ids: list[str]) -> pd.DataFrame:
    """The label columns of the predictions (``label``, or ``time`` and ``event``) for ``case_ids``;
    none without a label table, empty cells for cases it leaves out."""
    if labels is None:
        return pd.DataFrame(index=range(len(case_ids)))
    table = labels.set_index("case_id")
    if task_type != "survival":
        unknown = table[~table["label"].astype(str).isin(classes or [])]
        if len(unknown):
            row = labels.index[labels["case_id"] == unknown.index[0]][0] + 2
            raise ValueError(f"{where} row {row}: label {unknown['label'].iloc[0]!r} of case {unknown.index[0]!r} "
                             f"is not a class the models were trained on ({', '.join(classes or [])}); map it to "
                             "one of them or drop the row")
        return pd.DataFrame({"label": [table["label"].get(c) for c in case_ids]}, dtype=object)
    return pd.DataFrame({"time": [table["time"].get(c) for c in case_ids],
                         "event": pd.array([table["event"].get(c) for c in case_ids], dtype="Int64")})


def predict_cohort(task: str, cohort: str, models: list[Path], slides: Path, inputs: list[Path],
                   labels: Path | None, predictions: list[Path], attention: list[Path], ensemble: Path,
                   record: Path, dev: torch.device | None = None) -> pd.DataFrame:
    """Every fold model predicts every bag of the cohort; writes every output; returns the ensemble."""
    if not len(models) == len(predictions) == len(attention):
        raise ValueError(f"{len(models)} models, {len(predictions)} predictions and {len(attention)} attention "
                         "files: give one of each per fold model")
    dev = dev or torch_device()
    members = load_members(models, dev)
    if len(members) != len(models):
        raise ValueError("--models: a model file is given twice")
    check_members(members, also=("family", "encoder", "bag"))
    first = members[0]
    if first.record["task"] != task:
        raise ModelFileError(f"{first.path}: a model of task {first.record['task']!r}, not {task!r}")
    spec = first.spec
    task_type, unit, classes = spec["task_type"], spec["bag"], first.record["classes"]
    label_table = load_labels(labels, task, task_type) if labels else None
    cases = sorted(pd.read_csv(slides, sep="\t", dtype={"slide_id": str, "case_id": str})["case_id"].unique())
    if spec["family"] == "e2e":
        bags = load_bags(slides, inputs, cases, unit)
        mag = spec["eval_magnification"]
        for u in [u for u, b in bags.items() if b.n_patches(mag) == 0]:
            logger.warning("%s %s: no patches at %dx — not predicted", unit, u, mag)
            del bags[u]
    else:
        bags, _ = load_feature_bags(slides, inputs, set(cases), unit)
    unit_ids = sorted(bags, key=lambda u: (bags[u].case_id, u))
    skipped = sorted(set(cases) - {b.case_id for b in bags.values()})
    logger.info("cohort %s, task %s, %s/%s: %d %s bags of %d cases (%d cases without usable patches%s), %d fold "
                "models", cohort, task, spec["family"], spec["name"], len(unit_ids), unit, len(cases), len(skipped),
                f": {', '.join(skipped)}" if skipped else "", len(members))
    if not unit_ids:
        raise ValueError(f"cohort {cohort}: no {unit} has usable patches for {spec['name']}; check "
                         f"results/cohorts/{cohort}/slides.tsv and its manifest")
    case_ids = [bags[u].case_id for u in unit_ids]
    label_cols = label_columns(label_table, task_type, classes, str(labels), case_ids)
    ids = pd.DataFrame({"case_id": case_ids})
    if unit == "slide":
        ids.insert(0, "slide_id", unit_ids)
    tables = []
    for member, pred_out, attn_out in zip(members, predictions, attention):
        logits, parts = [], []
        for u in unit_ids:
            out, attn, where = predict_bag(member.net, bags[u], member.spec, dev)
            logits.append(out.cpu())
            parts.append((attn, where))
        table = pd.concat([ids, label_cols, scores(task_type, torch.cat(logits), classes)], axis=1)
        with atomic_path(pred_out) as tmp:
            table.to_csv(tmp, sep="\t", index=False)
        write_attention(attn_out, spec["eval_magnification"], split_attention(parts))
        tables.append(table)
        logger.info("fold %s model %s: %d %ss predicted", member.record["fold"], member.path, len(table), unit)
    ens = pd.concat([ids, label_cols, mean_scores(tables)], axis=1)
    with atomic_path(ensemble) as tmp:
        ens.to_csv(tmp, sep="\t", index=False)
    write_json(record, {
        "cohort": cohort, "task": task, "task_type": task_type, "method": spec["name"], "family": spec["family"],
        "bag": unit, "classes": classes, "labelled": label_table is not None,
        "labels": str(labels) if labels else None, "n_bags": len(unit_ids), "cases_without_patches": skipped,
        "folds": [m.record["fold"] for m in members],
        "models": [{"path": str(m.path), "sha256": m.sha256, "fold": m.record["fold"]} for m in members],
        "predictions": [p.name for p in predictions], "attention": [p.name for p in attention],
        "ensemble": ensemble.name,
    })
    return ens


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath predict_cohort", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--task", required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--models", nargs="+", required=True, type=Path, help="the method's fold models, in fold order")
    ap.add_argument("--slides", required=True, type=Path, help="the cohort's QC table (slide → case)")
    ap.add_argument("--inputs", nargs="+", required=True, type=Path,
                    help="the cohort's patch rows (E2E) or feature files (two-stage), per slide or per shard")
    ap.add_argument("--labels", nargs="*", required=True, type=Path,
                    help="the cohort's label table of the task; none (a bare --labels): predicted, not scored")
    ap.add_argument("--predictions", nargs="+", required=True, type=Path)
    ap.add_argument("--attention", nargs="+", required=True, type=Path)
    ap.add_argument("--ensemble", required=True, type=Path)
    ap.add_argument("--record", required=True, type=Path)
    args = ap.parse_args(argv)
    if len(args.labels) > 1:
        ap.error("--labels: at most one label table")
    try:
        predict_cohort(args.task, args.cohort, args.models, args.slides, args.inputs,
                       args.labels[0] if args.labels else None, args.predictions, args.attention, args.ensemble,
                       args.record)
    except (ModelFileError, ValueError, OSError) as err:
        logger.error("cohort %s, task %s: %s", args.cohort, args.task, err)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
