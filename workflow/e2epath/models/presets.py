"""Patch-encoder presets: what each encoder e2epath can build is, as plain data.

One preset per encoder: its architecture and constructor arguments, the input it expects (size,
normalisation, magnification), how its embedding is formed and how wide it is, the dtype it runs
in on CUDA, and where its weights come from. `e2epath.models.encoders` builds them; the workflow
reads this module at parse time (it imports nothing heavy), and `python -m e2epath encoders` prints it.

Architectures:
- ``resnet18`` / ``resnet50``: torchvision ResNets cut after ``layer3`` (the paper's encoders).
- ``timm:<name>``: any timm architecture, built with ``kwargs`` (``num_classes: 0`` keeps the
  embedding). Layer classes in kwargs are named by string from :data:`LAYER_CLASSES`.
- ``ctranspath``: timm's Swin-T with CTransPath's convolutional patch embedding.

Weights (a preset's ``weights``, or a config's ``encoders.<name>.weights`` / method ``weights``):
- ``imagenet``: torchvision's checkpoint (ResNets only), fetched once into the torch cache;
- ``hf:<org>/<repo>/<file>``: that file of a Hugging Face model repository, from the *local*
  Hugging Face cache only (``$HF_HUB_CACHE``, default ~/.cache/huggingface/hub) — never downloaded
  at run time;
- a path: a ``.safetensors``, ``.bin``, ``.pth`` or ``.pt`` state dict (common wrappers unwrapped);
- ``None``: random initialisation (ResNets and ``timm:`` encoders only; never a foundation model).

Facts per preset are taken from each model's card and the peers that build them (TRIDENT, STAMP,
eva); docs/encoders.md lists them, and the encoders that are not here and why (CONCH v1.5: its
attentional pooler exists only in the authors' code).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from e2epath.data.stats import IMAGENET_MEAN, IMAGENET_STD

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# How the embedding is formed: the model's own pooled output (a ViT's class token, a Swin's or
# ResNet's average pool), or the class token concatenated with the mean of the patch tokens
# (register tokens excluded: Virchow2).
EMBEDDINGS = ("pooled", "cls", "cls+mean")
DTYPES = ("fp32", "fp16", "bf16")
# Layer classes a preset's kwargs may name (no arbitrary imports from a config).
LAYER_CLASSES = ("SwiGLUPacked", "SwiGLU", "SiLU", "GELU")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Preset:
    """An encoder e2epath can build."""

    arch: str                      # resnet18 | resnet50 | ctranspath | timm:<name>
    dim: int                       # embedding width
    embedding: str = "pooled"      # one of EMBEDDINGS
    kwargs: dict = field(default_factory=dict)  # constructor arguments (timm)
    input_size: int = 224          # px the encoder sees (patches are resized to it)
    mean: tuple = IMAGENET_MEAN    # RGB normalisation, 0-1 scale
    std: tuple = IMAGENET_STD
    magnification: int = 20        # the magnification it was trained at (µm/px = 10 / magnification)
    dtype: str = "fp16"            # inference dtype on CUDA (CPU: fp32)
    weights: str | None = None     # the default weights (see the module docstring)
    foundation: bool = False       # a pathology foundation model (never random weights; two-stage lr 1e-4)
    blocks: str = "blocks"         # the attribute holding its blocks (E2E `trainable_blocks`)
    licence: str = ""
    source: str = ""               # where the user gets the weights

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def _hub(repo: str, file: str) -> str:
    return f"{HF_PREFIX}{repo}/{file}"


TORCHVISION = ("BSD-3-Clause (torchvision)", "torchvision ImageNet-1k (fetched into the torch cache)")
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

PRESETS: dict[str, Preset] = {
    "resnet18": Preset("resnet18", 256, weights="imagenet", blocks="layer3", licence=TORCHVISION[0],
                       source=TORCHVISION[1]),
    "resnet50": Preset("resnet50", 1024, weights="imagenet", blocks="layer3", licence=TORCHVISION[0],
                       source=TORCHVISION[1]),
    "uni": Preset(
        "timm:vit_large_patch16_224", 1024, "cls",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        weights=_hub("MahmoodLab/UNI", "pytorch_model.bin"), foundation=True,
        licence="CC-BY-NC-ND-4.0, gated (accept the terms on Hugging Face)",
        source="huggingface.co/MahmoodLab/UNI"),
    "uni2": Preset(
        "timm:vit_giant_patch14_224", 1536, "cls",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
         "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
         "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
        dtype="bf16", weights=_hub("MahmoodLab/UNI2-h", "pytorch_model.bin"), foundation=True,
        licence="CC-BY-NC-ND-4.0, gated", source="huggingface.co/MahmoodLab/UNI2-h"),
    "virchow2": Preset(
        "timm:vit_huge_patch14_224", 2560, "cls+mean",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "reg_tokens": 4,
         "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        weights=_hub("paige-ai/Virchow2", "pytorch_model.bin"), foundation=True,
        licence="CC-BY-NC-ND-4.0, gated", source="huggingface.co/paige-ai/Virchow2"),
    "hoptimus0": Preset(
        "timm:vit_giant_patch14_reg4_dinov2", 1536, "cls",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        weights=_hub("bioptimus/H-optimus-0", "pytorch_model.bin"), foundation=True,
        licence="Apache-2.0", source="huggingface.co/bioptimus/H-optimus-0"),
    "gigapath": Preset(
        "timm:vit_giant_patch14_dinov2", 1536, "cls",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        weights=_hub("prov-gigapath/prov-gigapath", "pytorch_model.bin"), foundation=True,
        licence="Apache-2.0, gated", source="huggingface.co/prov-gigapath/prov-gigapath (tile encoder)"),
    "ctranspath": Preset(
        "ctranspath", 768, "pooled", {"num_classes": 0}, dtype="fp32", blocks="layers",
        weights=None, foundation=True,
        licence="GPL-3.0 (weights: the authors' release)",
        source="the CTransPath authors' release, ctranspath.pth (github.com/Xiyue-Wang/TransPath)"),
    "phikon2": Preset(
        "timm:vit_large_patch14_dinov2", 1024, "cls",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
        weights=_hub("owkin/phikon-v2", "model.safetensors"), foundation=True, dtype="fp32",
        licence="Owkin non-commercial", source="huggingface.co/owkin/phikon-v2 (a transformers Dinov2 "
                                              "checkpoint; its keys are renamed to timm's on loading)"),
}
# The same architectures with other weights: H-optimus-1 is H-optimus-0's design; CHIEF's patch
# encoder is a CTransPath.
PRESETS["hoptimus1"] = replace(PRESETS["hoptimus0"], weights=_hub("bioptimus/H-optimus-1", "pytorch_model.bin"),
                               licence="non-commercial, gated", source="huggingface.co/bioptimus/H-optimus-1")
PRESETS["chief"] = replace(PRESETS["ctranspath"], licence="AGPL-3.0 (weights: the authors' release)",
                           source="CHIEF's patch encoder, CHIEF_CTransPath.pth (github.com/hms-dbmi/CHIEF)")
FIELDS = tuple(f.name for f in fields(Preset))


class EncoderError(ValueError):
    """An encoder that cannot be defined or built; the message names it and what to do."""


def is_hub(weights: str | None) -> bool:
    return isinstance(weights, str) and weights.startswith(HF_PREFIX)


def parse_hub(weights: str) -> tuple[str, str]:
    """``hf:<org>/<repo>/<file>`` → (repo id, file)."""
    parts = weights[len(HF_PREFIX):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise EncoderError(f"weights {weights!r}: a Hugging Face id is hf:<org>/<repo>/<file>, e.g. "
                           "hf:MahmoodLab/UNI/pytorch_model.bin")
    return f"{parts[0]}/{parts[1]}", parts[2]


def weights_source(weights: str | None) -> str:
    """How a weights value is resolved: imagenet | hub | file | none."""
    if weights is None:
        return "none"
    if weights == "imagenet":
        return "imagenet"
    return "hub" if is_hub(weights) else "file"


def encoder_spec(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A preset, or a config entry of ``encoders:`` on top of it (a new name needs ``arch`` and
    ``dim``), as the plain dict jobs receive; ``kwargs`` merge key by key."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise EncoderError(f"config encoders.{name}: unknown keys {unknown}; valid: {', '.join(FIELDS)}")
    if name in PRESETS:
        base = PRESETS[name].to_dict()
        if "arch" in overrides and overrides["arch"] != base["arch"]:
            raise EncoderError(f"config encoders.{name}: {name!r} is a preset ({base['arch']}); give your own "
                               "architecture another name")
    else:
        missing = [k for k in ("arch", "dim") if k not in overrides]
        if missing:
            raise EncoderError(f"config encoders.{name}: not a preset ({', '.join(PRESETS)}), so it needs "
                               f"{' and '.join(missing)} (e.g. arch: timm:vit_small_patch16_224, dim: 384)")
        base = Preset(overrides["arch"], overrides["dim"]).to_dict()
    spec = copy.deepcopy(base)
    for key, value in overrides.items():
        spec[key] = {**spec["kwargs"], **value} if key == "kwargs" else copy.deepcopy(value)
    spec["name"] = name
    check_spec(spec)
    return spec


def check_spec(spec: dict[str, Any]) -> None:
    name, arch = spec["name"], spec["arch"]
    if arch not in ("resnet18", "resnet50", "ctranspath") and not arch.startswith("timm:"):
        raise EncoderError(f"encoder {name!r}: arch {arch!r} is not resnet18, resnet50, ctranspath or timm:<name>")
    if spec["embedding"] not in EMBEDDINGS:
        raise EncoderError(f"encoder {name!r}: embedding {spec['embedding']!r} is not one of {EMBEDDINGS}")
    if spec["dtype"] not in DTYPES:
        raise EncoderError(f"encoder {name!r}: dtype {spec['dtype']!r} is not one of {DTYPES}")
    if len(spec["mean"]) != 3 or len(spec["std"]) != 3:
        raise EncoderError(f"encoder {name!r}: mean and std are three numbers (RGB, 0-1 scale)")
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        value = spec["kwargs"].get(key)
        if value is not None and value not in LAYER_CLASSES:
            raise EncoderError(f"encoder {name!r}: kwargs.{key} {value!r} is not one of {LAYER_CLASSES}")
    if spec["weights"] == "imagenet" and arch not in ("resnet18", "resnet50"):
        raise EncoderError(f"encoder {name!r}: weights: imagenet is torchvision's, for resnet18 / resnet50; give "
                           "a weights file or a hf:<org>/<repo>/<file> id from the local Hugging Face cache")
    if is_hub(spec["weights"]):
        parse_hub(spec["weights"])


def check_weights(spec: dict[str, Any], weights: str | None, where: str) -> None:
    """Refuse what would give a foundation model random weights, or torchvision weights to a
    non-ResNet; ``where`` names the config key."""
    if weights is None and spec["foundation"]:
        raise EncoderError(f"{where}: {spec['name']} is a foundation model: it is only meaningful with its weights; "
                           f"give weights: <file> or a hf:<org>/<repo>/<file> id (get them from {spec['source']})")
    if weights == "imagenet" and spec["arch"] not in ("resnet18", "resnet50"):
        raise EncoderError(f"{where}: weights: imagenet is for resnet18 / resnet50, not {spec['name']}")
    if is_hub(weights):
        parse_hub(weights)


def resolve_encoders(config: dict) -> dict[str, dict[str, Any]]:
    """Every preset, with the config's ``encoders:`` entries applied (and its own encoders added)."""
    entries = config.get("encoders") or {}
    out = {name: PRESETS[name].to_dict() | {"name": name} for name in PRESETS}
    for name, overrides in entries.items():
        out[name] = encoder_spec(name, overrides)
    return out


def list_presets() -> list[dict[str, Any]]:
    """The presets as rows (name first): what `python -m e2epath encoders` prints."""
    return [{"name": name, **p.to_dict()} for name, p in PRESETS.items()]


def cli(argv: list[str] | None = None) -> int:
    """`python -m e2epath encoders [--config FILE] [--json]`: the encoder presets (with a config:
    its encoders too) — embedding width, input, magnification, CUDA dtype, and where the weights
    are expected (and whether they are there)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="e2epath encoders", description=cli.__doc__)
    ap.add_argument("--config", default=None, help="a config file: list its encoders (presets with its changes)")
    ap.add_argument("--json", action="store_true", help="every field, as JSON")
    a = ap.parse_args(argv)
    if a.config:
        import yaml

        try:
            specs = resolve_encoders(yaml.safe_load(open(a.config)) or {})
        except (OSError, yaml.YAMLError, EncoderError) as err:
            print(f"{a.config}: {err}", file=sys.stderr)
            return 2
    else:
        specs = {row["name"]: row for row in list_presets()}
    if a.json:
        print(json.dumps(specs, indent=1))
        return 0
    rows = [("name", "arch", "dim", "input", "mag", "dtype", "weights (expected at)", "licence")]
    for name, spec in specs.items():
        rows.append((name, spec["arch"], str(spec["dim"]), f"{spec['input_size']} px", f"{spec['magnification']}x",
                     spec["dtype"], where_weights(spec), spec["licence"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def where_weights(spec: dict[str, Any]) -> str:
    """Where an encoder's default weights are expected, for people: the cache folder, the file, or
    what to give."""
    weights = spec["weights"]
    source = weights_source(weights)
    if source == "imagenet":
        return "imagenet: torch cache ($TORCH_HOME/hub/checkpoints)"
    if source == "hub":
        repo, file = parse_hub(weights)
        return f"{weights}: $HF_HUB_CACHE/models--{repo.replace('/', '--')}/snapshots/*/{file}"
    if source == "file":
        return weights
    return f"none: give weights: <file> ({spec['source']})" if spec["foundation"] else "none (random init)"
