"""The model file (`model.pt` of a training run; docs/contracts.md "Model files"): everything a
trained model needs to be applied to new slides. Training writes it (`write_model`), cohort
prediction and `python -m e2epath predict` read it (`read_model`) and rebuild the network
(`rebuild`); nothing else opens one.

Content (format `MODEL_FORMAT`): ``model`` (the selected weights' state dict), ``spec`` (the
method's resolved hyper-parameters with its encoder's preset), ``weights`` (raw | ema: which won on
validation), ``best_epoch``, ``task``, ``fold``, ``seed``, ``preprocess`` (the config's preprocess
settings its slides were prepared with), ``classes`` / ``bins`` / ``n_outputs`` (the task's outputs),
``encoder`` (name, weights, path and sha256 of the encoder's checkpoint), ``encoder_weights`` (E2E) or
``in_dim`` (two-stage: the features' width), ``format_version``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from e2epath.core.io import atomic_path
from e2epath.models.aggregators import build_aggregator
from e2epath.models.e2e import E2EModel
from e2epath.models.encoders import make_encoder

# 2: the preprocessing settings, the task and its outputs are recorded (what `predict` needs).
MODEL_FORMAT = 2
REQUIRED = ("model", "spec", "task", "fold", "seed", "preprocess", "n_outputs", "format_version")


class ModelFileError(ValueError):
    """A model file that cannot be applied to new slides; the message names it and what to do."""


def write_model(path: Path, state: dict[str, torch.Tensor], spec: dict[str, Any], **record: Any) -> None:
    """Write a model file atomically: the weights, the method's spec and ``record`` (task, fold,
    seed, best_epoch, weights, preprocess, the task's outputs, the encoder's record)."""
    missing = [k for k in REQUIRED if k not in ("model", "spec", "format_version") and k not in record]
    if missing:
        raise ValueError(f"{path}: a model file records {', '.join(missing)} too")
    with atomic_path(path) as tmp:
        torch.save({"model": state, "spec": spec, **record, "format_version": MODEL_FORMAT}, tmp)


def read_model(path: Path) -> dict[str, Any]:
    """A model file's record; ModelFileError naming the file when it cannot be deployed (missing,
    not a model file, written by another format)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file, whatever torch says
        raise ModelFileError(f"{path}: not a readable e2epath model file ({type(err).__name__}: {err})") from err
    if not isinstance(rec, dict) or "spec" not in rec or "model" not in rec:
        raise ModelFileError(f"{path}: not an e2epath model file (results/{{e2e,twostage}}/TASK/METHOD/foldK/model.pt)")
    if rec.get("format_version") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: written in model-file format {rec.get('format_version')}, this e2epath reads "
                             f"format {MODEL_FORMAT}. Retrain it with this version: snakemake reruns its training job")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ModelFileError(f"{path}: a model file without {', '.join(missing)} (damaged, or edited by hand). Retrain "
                             "it: delete it and snakemake reruns its training job")
    return rec


def rebuild(rec: dict[str, Any], path: Path) -> nn.Module:
    """The trained network of a model file's record, in eval mode: E2E encoder + aggregator, or the
    two-stage aggregator (its features' encoder is built by whoever extracts the features)."""
    spec = rec["spec"]
    kw = spec["aggregator_kw"]
    if spec["family"] == "e2e":
        encoder = make_encoder(spec["encoder_spec"])
        net: nn.Module = E2EModel(encoder, build_aggregator(spec["aggregator"], encoder.out_dim, rec["n_outputs"],
                                                            **kw))
    else:
        net = build_aggregator(spec["aggregator"], rec["in_dim"], rec["n_outputs"], **kw)
    try:
        net.load_state_dict(rec["model"], strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{path}: its weights do not fit its own spec ({err}); the file is damaged") from err
    return net.eval()
