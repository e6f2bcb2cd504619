"""Single-slide deployment without Snakemake:

    python -m e2epath predict --model M [--model M2 ...] --out DIR SLIDE [SLIDE ...]

Each slide goes through QC, tissue segmentation and patching (into a temporary store) with the
settings recorded in the model files (magnification, patch size, mpp tolerance, tissue
parameters, JPEG quality), then through every given model (the fold models of a method, say) with
its own input size, normalisation and classes; the prediction is their ensemble (mean class
probability, mean risk). Per slide, in DIR (names: `e2epath.core.layout.PREDICT_FILES`):

- `{slide}.json`: the summary — status, slide mpp and its source, magnification, patches, the
  ensemble and per-model predictions, the models (path, sha256), and the files below;
- `{slide}.predictions.tsv`: one row per model and one `ensemble` row (`prob_<class>` or `risk`);
- `{slide}.attention.png`: the attention map over the slide at `--map-mpp` µm/px,
  percentile colour scale within the slide, tissue contours drawn;
- `{slide}.montage.png`: the `--top-k` most and least attended patches with their level-0 coords;
- `{slide}.attention.geojson`: the patches as QuPath detections, `measurements` the attention of
  each head (of each model) and their mean.

A slide that cannot give the model's magnification (a 20x scan for a 40x model), or that fails
QC, is refused with the reason in its summary and the log; the others go on, and the command
exits 1 when any slide was refused. A model file of another format is refused with what to do.
Attention is the mean over heads, then over models. The defaults of `--map-mpp`, `--top-k` and
`--batch-size` are the config schema's (`maps.mpp`, `maps.top_k`, `twostage.batch_size`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from e2epath.core import schema
from e2epath.core.devices import torch_device
from e2epath.core.io import atomic_path, write_json
from e2epath.core.layout import PREDICT_FILES
from e2epath.core.vocabulary import ID_RE
from e2epath.data.bags import Bag
from e2epath.data.decoding import decode_threads_for
from e2epath.deploy.ensemble import Member, check_members, load_members, mean_scores
from e2epath.features.extraction import build_frozen_encoder, extract
from e2epath.features.files import FeatureBag
from e2epath.figures.heatmaps import tissue_rings
from e2epath.figures.maps import measurements, patch_side_l0, write_slide_maps
from e2epath.preprocess.patching import PatchParams, patch_to_files
from e2epath.preprocess.qc import slide_qc
from e2epath.preprocess.store import LmdbReader, close_all
from e2epath.preprocess.tissue import run as segment_tissue
from e2epath.preprocess.tissue import tissue_params
from e2epath.train.inference import predict_bag
from e2epath.train.modelfile import ModelFileError
from e2epath.train.tasks import scores

logger = logging.getLogger(__name__)


class FeatureEncoders:
    """The frozen feature encoders of two-stage models, built once per encoder as their feature jobs
    built them (weights policy, seeded initialisation)."""

    def __init__(self) -> None:
        self.built: dict[str, nn.Module] = {}

    def features(self, model: Member, store: LmdbReader, args: argparse.Namespace, dev: torch.device) -> FeatureBag:
        """The features of every patch of ``store`` as ``model``'s aggregator was trained on them."""
        spec = model.spec
        enc = spec["encoder_spec"]
        key = repr((enc, spec["weights"], model.record["seed"]))
        if key not in self.built:
            self.built[key] = build_frozen_encoder(enc, spec["weights"], model.record["seed"], dev)
        feats = extract(self.built[key], store, enc["input_size"], args.batch_size, dev, decode_threads_for(dev))
        slide = store.meta["slide_id"]
        return FeatureBag(slide, slide, feats.float(), [(slide, store.coords)])


def slide_name(path: Path, taken: set[str]) -> str:
    """A file-name-safe id from the slide's file name (unique within the call)."""
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "slide"
    base, k = name, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    assert ID_RE.match(name)
    return name


def prepare(path: Path, slide: str, mpp: float | None, prep: dict[str, Any], magnification: int, folder: Path,
            threads: int) -> tuple[dict, dict, dict]:
    """QC, tissue and patches of one slide into ``folder`` with the model's recorded preprocessing:
    (QC record, tissue GeoJSON, patch row)."""
    qc = slide_qc(slide, slide, path, mpp)
    if qc["status"] != "ok":
        return qc, {}, {"status": "failed", "message": f"slide QC failed: {qc['error']}"}
    tissue = prep["tissue"]
    paths = {k: folder / f"{slide}.{k}" for k in ("mask.png", "geojson", "thumb.png")}
    segment_tissue(qc, tissue_params(**tissue), paths["mask.png"], paths["geojson"], paths["thumb.png"],
                   tissue["preset"])
    params = PatchParams(magnification, prep["patch_size"], prep["min_tissue"], prep["mpp_tolerance"],
                         prep["allow_upsample"], prep["jpeg_quality"], threads)
    row = patch_to_files(qc, paths["mask.png"], paths["geojson"], params, folder / f"{slide}.lmdb",
                         folder / f"{slide}.row.json")
    return qc, json.loads(paths["geojson"].read_text()), row


def predict_slide(path: Path, slide: str, models: list[Member], out: Path, args: argparse.Namespace,
                  dev: torch.device, encoders: FeatureEncoders) -> dict[str, Any]:
    """Everything `predict` writes for one slide; returns its summary (also written)."""
    files = {k: v.format(slide=slide) for k, v in PREDICT_FILES.items()}
    first = models[0]
    spec, prep, mag = first.spec, first.record["preprocess"], first.spec["eval_magnification"]
    used = [{"path": str(m.path), "sha256": m.sha256, "method": m.spec["name"], "fold": m.record["fold"]}
            for m in models]
    summary: dict[str, Any] = {"slide_id": slide, "path": str(path.resolve()), "status": "refused", "reason": "",
                               "task": first.record["task"], "task_type": spec["task_type"],
                               "magnification": mag, "models": used}
    with tempfile.TemporaryDirectory(prefix=f"e2epath-predict-{slide}-") as tmp:
        qc, tissue, row = prepare(path, slide, args.mpp, prep, mag, Path(tmp), args.threads)
        summary.update(slide_mpp=qc.get("mpp"), mpp_source=qc.get("mpp_source"))
        if row["status"] != "ok":
            summary["reason"] = f"cannot give the model's {mag}x patches: {row['status']}: {row.get('message')}"
            logger.error("slide %s (%s): refused — %s", slide, path, summary["reason"])
            write_json(out / files["summary"], summary)
            return summary
        store = LmdbReader(row["lmdb"])
        bag = Bag(slide, slide, [slide], {mag: [store]})
        logits, attentions = [], []
        for model in models:
            inputs = bag if model.spec["family"] == "e2e" else encoders.features(model, store, args, dev)
            lg, attn, _ = predict_bag(model.net, inputs, model.spec, dev)
            logits.append(lg.cpu())
            attentions.append(attn.float().cpu().numpy())
        classes = first.record["classes"]
        tables = [scores(spec["task_type"], lg, classes) for lg in logits]
        per_model = pd.concat(tables, ignore_index=True)
        per_model.insert(0, "model", [str(m.path) for m in models])
        ensemble = mean_scores(tables)
        ensemble.insert(0, "model", "ensemble")
        table = pd.concat([per_model, ensemble], ignore_index=True)
        with atomic_path(out / files["predictions"]) as t:
            table.to_csv(t, sep="\t", index=False)
        coords = store.coords.astype(np.int64)  # the attention's patches are the store's, in its order
        patch_l0 = patch_side_l0(store.meta)
        write_slide_maps(out, slide, path, qc["mpp"], coords, measurements(attentions), patch_l0,
                         tissue_rings(tissue), store.get_rgb, args.map_mpp, args.top_k,
                         {"slide_id": slide, "magnification": mag, "patch_size_level0": patch_l0})
        prediction = {c: float(ensemble.at[0, c]) for c in ensemble.columns if c != "model"}
        summary.update(status="ok", n_patches=len(store), patch_size_level0=patch_l0, prediction=prediction,
                       per_model=per_model.to_dict(orient="records"), classes=classes,
                       predicted_class=(max(classes, key=lambda c: prediction[f"prob_{c}"]) if classes else None),
                       files={k: v for k, v in files.items() if k != "summary"},
                       attention_map_mpp=args.map_mpp, attention_scale="percentile within the slide")
        close_all()  # the temporary store goes with the folder
    logger.info("slide %s: %d patches at %dx → %s", slide, summary["n_patches"], mag,
                ", ".join(f"{k} {v:.4f}" for k, v in summary["prediction"].items()))
    write_json(out / files["summary"], summary)
    return summary


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("slides", nargs="+", type=Path, help="slide files (anything OpenSlide opens)")
    ap.add_argument("--model", nargs="+", action="extend", required=True, type=Path,
                    help="model files (results/{e2e,twostage}/TASK/METHOD/foldK/model.pt); several: their ensemble")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--mpp", type=float, default=None, help="µm per pixel when a slide file does not say")
    ap.add_argument("--map-mpp", type=schema.arg_type("maps", "mpp"), default=schema.default("maps", "mpp"),
                    help="attention map resolution, µm/px (2 or coarser; default %(default)s, the config's maps.mpp)")
    ap.add_argument("--top-k", type=schema.arg_type("maps", "top_k"), default=schema.default("maps", "top_k"),
                    help="most and least attended patches in the montage (default %(default)s)")
    ap.add_argument("--batch-size", type=schema.arg_type("twostage", "batch_size"),
                    default=schema.default("twostage", "batch_size"),
                    help="patches per batch of a two-stage model's feature encoder (default %(default)s)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="patching threads (default: the CPUs this process may use, %(default)s)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    dev = torch_device()
    try:
        models = load_members(args.model, dev)
        check_members(models)
    except ModelFileError as err:
        logger.error("%s", err)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    refused = 0
    encoders = FeatureEncoders()
    for path in args.slides:
        slide = slide_name(path, taken)
        try:
            summary = predict_slide(path, slide, models, args.out, args, dev, encoders)
        except Exception as err:  # noqa: BLE001 - one bad slide never stops the others
            logger.exception("slide %s (%s): failed", slide, path)
            summary = {"slide_id": slide, "path": str(path), "status": "failed",
                       "reason": f"{type(err).__name__}: {err}"}
            write_json(args.out / PREDICT_FILES["summary"].format(slide=slide), summary)
        refused += summary["status"] != "ok"
    logger.info("%d slides: %d predicted, %d refused or failed (see their .json); outputs in %s", len(args.slides),
                len(args.slides) - refused, refused, args.out)
    return 1 if refused else 0

