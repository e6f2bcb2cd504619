"""Single-slide deployment without Snakemake:

    python -m e2epath predict --model M [--model M2 ...] --out DIR SLIDE [SLIDE ...]

Each slide goes through QC, tissue segmentation and patching (into a temporary store) with the
settings recorded in the model files (magnification, patch size, mpp tolerance, tissue
parameters, JPEG quality), then through every given model (the fold models of a method, say) with
its own input size, normalisation and classes; the prediction is their ensemble (mean class
probability, mean risk). Per slide, in DIR (names: `e2epath.layout.PREDICT_FILES`):

- `{slide}.json`: the summary — status, slide mpp and its source, magnification, patches, the
  ensemble and per-model predictions, the models (path, sha256), and the files below;
- `{slide}.predictions.tsv`: one row per model and one `ensemble` row (`prob_<class>` or `risk`);
- `{slide}.attention.png`: the attention map over the slide at `--map-mpp` µm/px (default 8),
  percentile colour scale within the slide, tissue contours drawn;
- `{slide}.montage.png`: the `--top-k` most and least attended patches with their level-0 coords;
- `{slide}.attention.geojson`: the patches as QuPath detections, `measurements` the attention of
  each head (of each model) and their mean.

A slide that cannot give the model's magnification (a 20x scan for a 40x model), or that fails
QC, is refused with the reason in its summary and the log; the others go on, and the command
exits 1 when any slide was refused. Model files written before e2epath recorded its preprocessing
(format 1) are refused with what to do. Attention is the mean over heads, then over models.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from e2epath.core.devices import torch_device
from e2epath.core.io import atomic_path, file_sha256, write_json
from e2epath.core.layout import PREDICT_FILES
from e2epath.core.vocabulary import ID_RE
from e2epath.data.bags import Bag
from e2epath.deploy.cohort import ModelFileError, read_model, rebuild
from e2epath.figures.heatmaps import tissue_rings
from e2epath.figures.maps import measurements, patch_side_l0, write_slide_maps
from e2epath.preprocess.patching import PatchParams, patch_to_files
from e2epath.preprocess.qc import slide_qc
from e2epath.preprocess.store import LmdbReader, close_all
from e2epath.preprocess.tissue import run as segment_tissue
from e2epath.preprocess.tissue import tissue_params
from e2epath.train.e2e import predict_bag
from e2epath.train.tasks import scores

logger = logging.getLogger(__name__)

# What must agree between the models of one ensemble (they predict one slide from one store).
SHARED = ("task_type", "classes", "eval_magnification", "preprocess")


@dataclass
class Deployed:
    """A trained model, rebuilt from its model file, ready to predict."""

    path: Path
    sha256: str
    record: dict[str, Any]
    net: nn.Module
    feature_encoder: nn.Module | None  # two-stage: the frozen encoder of its features

    @property
    def spec(self) -> dict[str, Any]:
        return self.record["spec"]

    def shared(self) -> dict[str, Any]:
        spec = self.spec
        return {"task_type": spec["task_type"], "classes": self.record.get("classes"),
                "eval_magnification": spec["eval_magnification"], "preprocess": self.record["preprocess"]}


def load_model(path: Path, dev: torch.device) -> Deployed:
    """A model file → the model (`external.read_model`, `external.rebuild`), with a two-stage model's
    feature encoder built exactly as its feature jobs built it (weights policy, seeded init);
    ModelFileError for a file that cannot be deployed."""
    rec = read_model(path)
    spec = rec["spec"]
    net = rebuild(rec, path)
    feature_encoder = None
    if spec["family"] != "e2e":
        from e2epath.features.extraction import build_frozen_encoder

        feature_encoder = build_frozen_encoder(spec["encoder_spec"], spec["weights"], rec["seed"], dev)
    logger.info("model %s: %s %s/%s fold %s, %s, %s at %dx, weights %s (epoch %s)", path, spec["family"],
                rec.get("task"), spec["name"], rec.get("fold"), spec["task_type"], spec["encoder"],
                spec["eval_magnification"], rec.get("weights"), rec.get("best_epoch"))
    return Deployed(path, file_sha256(path), rec, net.to(dev).eval(), feature_encoder)


def check_ensemble(models: list[Deployed]) -> None:
    """The models of one call must predict the same thing from the same patches."""
    first = models[0].shared()
    for model in models[1:]:
        other = model.shared()
        differ = [k for k in SHARED if other[k] != first[k]]
        if differ:
            raise ModelFileError(f"{model.path} and {models[0].path} differ in {', '.join(differ)}: they cannot "
                                 "form one ensemble; predict them in separate calls")


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


@torch.no_grad()
def infer(model: Deployed, bag: Bag, dev: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """(logits [1, outputs], attention [heads, N]) of one slide's bag."""
    spec = model.spec
    if model.feature_encoder is None:
        logits, attn, _ = predict_bag(model.net, bag, spec, dev)
        return logits.cpu(), attn.float().cpu().numpy()
    from e2epath.features.extraction import extract

    store = bag.stores[spec["eval_magnification"]][0]
    feats = extract(model.feature_encoder, store, spec["encoder_spec"]["input_size"], 64, dev, 2).float()
    logits, attn = model.net(feats[None].to(dev), return_attention=True)
    return logits.float().cpu(), attn[0].float().cpu().numpy()


def prepare(path: Path, slide: str, mpp: float | None, prep: dict[str, Any], magnification: int, folder: Path,
            threads: int) -> tuple[dict, dict, dict]:
    """QC, tissue and patches of one slide into ``folder``: (QC record, tissue GeoJSON, patch row)."""
    qc = slide_qc(slide, slide, path, mpp)
    if qc["status"] != "ok":
        return qc, {}, {"status": "failed", "message": f"slide QC failed: {qc['error']}"}
    tissue = prep["tissue"]
    paths = {k: folder / f"{slide}.{k}" for k in ("mask.png", "geojson", "thumb.png")}
    segment_tissue(qc, tissue_params(tissue["preset"], tissue["seg_mpp"]), paths["mask.png"], paths["geojson"],
                   paths["thumb.png"], tissue["preset"])
    params = PatchParams(magnification, prep["patch_size"], prep["min_tissue"], prep["mpp_tolerance"],
                         prep["allow_upsample"], prep["jpeg_quality"], threads)
    row = patch_to_files(qc, paths["mask.png"], paths["geojson"], params, folder / f"{slide}.lmdb",
                         folder / f"{slide}.row.json")
    return qc, json.loads(paths["geojson"].read_text()), row


def predict_slide(path: Path, slide: str, models: list[Deployed], out: Path, args: argparse.Namespace,
                  dev: torch.device) -> dict[str, Any]:
    """Everything `predict` writes for one slide; returns its summary (also written)."""
    files = {k: v.format(slide=slide) for k, v in PREDICT_FILES.items()}
    first = models[0]
    spec, prep, mag = first.spec, first.record["preprocess"], first.spec["eval_magnification"]
    used = [{"path": str(m.path), "sha256": m.sha256, "method": m.spec["name"], "fold": m.record.get("fold")}
            for m in models]
    summary: dict[str, Any] = {"slide_id": slide, "path": str(path.resolve()), "status": "refused", "reason": "",
                               "task": first.record.get("task"), "task_type": spec["task_type"],
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
            lg, attn = infer(model, bag, dev)
            logits.append(lg)
            attentions.append(attn)
        classes = first.record.get("classes")
        per_model = pd.concat([scores(spec["task_type"], lg, classes) for lg in logits], ignore_index=True)
        per_model.insert(0, "model", [str(m.path) for m in models])
        ensemble = per_model.drop(columns="model").mean().to_frame().T
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
    ap.add_argument("--map-mpp", type=float, default=8.0, help="attention map resolution, µm/px (2 or coarser)")
    ap.add_argument("--top-k", type=int, default=8, help="most and least attended patches in the montage")
    ap.add_argument("--threads", type=int, default=2, help="patching threads")
    args = ap.parse_args(argv)
    dev = torch_device()
    try:
        models = [load_model(p, dev) for p in dict.fromkeys(args.model)]
        check_ensemble(models)
    except ModelFileError as err:
        logger.error("%s", err)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    refused = 0
    for path in args.slides:
        slide = slide_name(path, taken)
        try:
            summary = predict_slide(path, slide, models, args.out, args, dev)
        except Exception as err:  # noqa: BLE001 - one bad slide never stops the others
            logger.exception("slide %s (%s): failed", slide, path)
            summary = {"slide_id": slide, "path": str(path), "status": "failed",
                       "reason": f"{type(err).__name__}: {err}"}
            write_json(args.out / PREDICT_FILES["summary"].format(slide=slide), summary)
        refused += summary["status"] != "ok"
    logger.info("%d slides: %d predicted, %d refused or failed (see their .json); outputs in %s", len(args.slides),
                len(args.slides) - refused, refused, args.out)
    return 1 if refused else 0

