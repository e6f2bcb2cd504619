"""The one weights policy of every encoder e2epath builds, end to end and two-stage (`build_encoder`),
and where weights come from (the `encoder_weights` step records them before any job uses them).

``weights:`` of an encoder or a method; never a silent random init:

- `"imagenet"` (ResNets): torchvision's ImageNet checkpoint from the torch hub cache
  (`$TORCH_HOME`, default ~/.cache/torch). The workflow's `encoder_weights` job puts it there once
  before any training job starts — from the cache, or with torchvision's own download where the
  machine (on a cluster: the submit host) is online — and fails with the cache path and the
  alternatives when it can be had neither way (`fetch_imagenet`). Training and feature jobs never
  download (compute nodes are often offline): a missing checkpoint is an error naming the path.
- `"hf:<org>/<repo>/<file>"`: a file of a Hugging Face repository from the local Hugging Face cache
  only (`$HF_HUB_CACHE`); never downloaded — the error says where it was looked for and how to get it.
- any other string: a local state-dict file (`e2epath.models.checkpoints`), loaded strictly;
- `None`: random initialisation, said in the log (never for a foundation model).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchvision

from e2epath.core.io import file_sha256, write_json
from e2epath.models.checkpoints import load_weights
from e2epath.models.encoders import Encoder, make_encoder
from e2epath.models.presets import PRESETS, EncoderError, check_weights, encoder_spec, parse_hub, weights_source

logger = logging.getLogger(__name__)

# The torchvision ImageNet weight enums of the ResNet presets, in preference order (first wins).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1",),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"),
}


def imagenet_checkpoint_paths(arch: str) -> list[Path]:
    """Where torchvision would have cached the ImageNet checkpoint(s) of `arch`, in preference order."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    paths = []
    for enum_name in ARCHITECTURES[arch]:
        enum, member = enum_name.split(".")
        url = getattr(getattr(torchvision.models, enum), member).url
        paths.append(folder / url.rsplit("/", 1)[-1])
    return paths


def find_imagenet_checkpoint(arch: str) -> Path | None:
    return next((p for p in imagenet_checkpoint_paths(arch) if p.is_file()), None)


def _missing_imagenet(arch: str, why: str) -> str:
    tried = ", ".join(str(p) for p in imagenet_checkpoint_paths(arch))
    return (f"ImageNet weights for {arch} are not in the torch cache ({tried}) and {why}. Copy torchvision's "
            f"checkpoint there (or point TORCH_HOME at a cache holding it), give the file itself as "
            f"`weights: <file>`, or train from scratch with `weights: null`")


def fetch_imagenet(arch: str) -> Path:
    """The cached ImageNet checkpoint of ``arch``, downloaded first with torchvision's own download
    (into the torch hub cache) when it is not there; a FileNotFoundError saying where it was looked
    for and what to do when it can be had neither way."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown encoder {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    found = find_imagenet_checkpoint(arch)
    if found is not None:
        logger.info("encoder %s: ImageNet weights in the torch cache: %s", arch, found)
        return found
    enum, member = ARCHITECTURES[arch][0].split(".")
    weights = getattr(getattr(torchvision.models, enum), member)
    logger.info("encoder %s: downloading torchvision's ImageNet weights %s into %s", arch, weights.url,
                imagenet_checkpoint_paths(arch)[0].parent)
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - offline, proxy, disk: say what to do instead
        raise FileNotFoundError(_missing_imagenet(arch, f"could not be downloaded ({type(err).__name__}: {err})")) \
            from err
    found = find_imagenet_checkpoint(arch)
    if found is None:
        raise FileNotFoundError(_missing_imagenet(arch, "torchvision's download did not leave it there"))
    return found


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def hub_file(weights: str, encoder: str = "") -> Path:
    """The local file of ``hf:<org>/<repo>/<file>``, from the local cache only (never downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    repo, name = parse_hub(weights)
    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo, name, cache_dir=cache)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    who = f"encoder {encoder}: " if encoder else ""
    raise FileNotFoundError(
        f"{who}weights {weights}: {name} of {repo} is not in the local Hugging Face cache {cache} "
        f"(looked for {cache / ('models--' + repo.replace('/', '--'))}/snapshots/*/{name}); e2epath never downloads "
        f"at run time. On a machine with internet, accept the model's terms on huggingface.co/{repo} if it is "
        f"gated, then `hf download {repo} {name}` with the same HF_HUB_CACHE (or HF_HOME) the jobs see; or give "
        "the file itself as weights: <path>")


def resolve_weights_file(weights: str, encoder: str) -> Path:
    """The local checkpoint file behind a weights value (imagenet: the torch cache; hf: the
    Hugging Face cache; else the path itself); FileNotFoundError saying where and how to get it."""
    source = weights_source(weights)
    if source == "imagenet":
        found = find_imagenet_checkpoint(encoder)
        if found is None:
            raise FileNotFoundError(_missing_imagenet(encoder, "jobs never download (the encoder_weights job "
                                                               "fetches it before training)"))
        return found
    if source == "hub":
        return hub_file(weights, encoder)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder {encoder}: weights file {path} does not exist; give an existing file "
                                "(.safetensors, .bin, .pth, .pt), a hf:<org>/<repo>/<file> id in the local Hugging "
                                "Face cache, imagenet (ResNets), or null for random initialisation (not for a "
                                "foundation model)")
    return path


def weights_record(weights: str | None, pretrained: list[Path]) -> dict:
    """What an encoder's weights were, for the files a job writes: the source, and for a
    checkpoint its path and sha256 — from the encoder_weights record (imagenet, hf) or the weights
    file the workflow hands the job (``pretrained``), else from the file itself."""
    if weights is None:
        return {"weights": None}
    if weights_source(weights) in ("imagenet", "hub"):
        if pretrained:
            import json

            rec = json.loads(Path(pretrained[0]).read_text())
            return {"weights": weights, "path": rec["path"], "sha256": rec["sha256"]}
        raise ValueError(f"weights {weights} need the encoder_weights record (--pretrained RECORD.json, written "
                         "by `python -m e2epath encoder_weights`)")
    source = Path(pretrained[0]) if pretrained else Path(weights).expanduser()
    return {"weights": str(weights), "path": str(source.resolve()), "sha256": file_sha256(source)}


def build_encoder(encoder: str | dict[str, Any], weights: Any = "preset", seed: int | None = None) -> Encoder:
    """The encoder ``encoder`` (a preset name or a resolved spec from `e2epath.presets`) with
    ``weights`` (default: the spec's own; see the module docstring). ``out_dim`` is its embedding width.

    ``seed`` seeds torch's global generator first, so every job of a run (each fold, each slide's
    feature extraction) builds the very same randomly initialised layers.
    """
    if isinstance(encoder, str):
        if encoder not in PRESETS:
            raise ValueError(f"unknown encoder {encoder!r}; presets: {', '.join(PRESETS)} (others are defined in "
                             "the config's encoders section)")
        encoder = encoder_spec(encoder)
    spec = encoder
    if weights == "preset":
        weights = spec["weights"]
    check_weights(spec, weights, f"encoder {spec['name']}")
    if seed is not None:
        torch.manual_seed(seed)
    model = make_encoder(spec)
    if weights is None:
        logger.warning("encoder %s: random initialisation (weights: null), no pretrained weights", spec["name"])
        return model
    load_weights(model, resolve_weights_file(weights, spec["arch"] if weights == "imagenet" else spec["name"]))
    return model


def cli_weights(argv: list[str] | None = None) -> int:
    """`python -m e2epath encoder_weights --encoder NAME --weights W --out RECORD.json`: the
    checkpoint of ``imagenet`` (torchvision's, in the torch cache; downloaded there if needed and
    possible) or of ``hf:<org>/<repo>/<file>`` (the local Hugging Face cache only), recorded as
    {encoder, weights, path, sha256}; exit 1 with where it was looked for and what to do."""
    import argparse

    ap = argparse.ArgumentParser(prog="e2epath encoder_weights", description=cli_weights.__doc__)
    ap.add_argument("--encoder", required=True, help="the encoder's name (the record's)")
    ap.add_argument("--arch", required=True, help="its architecture (imagenet: resnet18 or resnet50)")
    ap.add_argument("--weights", required=True, help="imagenet or hf:<org>/<repo>/<file>")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    source = weights_source(a.weights)
    if source not in ("imagenet", "hub"):
        ap.error(f"--weights {a.weights!r}: imagenet or hf:<org>/<repo>/<file> (files need no record)")
    try:
        if source == "imagenet":
            arch = a.arch
            if arch not in ARCHITECTURES:
                ap.error(f"--weights imagenet is for {', '.join(ARCHITECTURES)}, not {arch}")
            path = fetch_imagenet(arch)
        else:
            path = hub_file(a.weights, a.encoder)
    except (FileNotFoundError, EncoderError) as err:
        logger.error("%s", err)
        return 1
    write_json(a.out, {"encoder": a.encoder, "weights": a.weights, "path": str(path), "sha256": file_sha256(path)})
    logger.info("encoder %s: weights %s = %s recorded in %s", a.encoder, a.weights, path, a.out)
    return 0
