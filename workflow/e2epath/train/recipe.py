"""Every method's hyper-parameters, resolved per task: the one owner of method defaults.

The defaults are the published recipe of the ABMILX paper — W. Tang et al., "Revisiting End-to-End
Learning with Slide-level Supervision in Computational Pathology", NeurIPS 2025, arXiv:2506.02408
("the paper"): its appendix B.3, and where they are more specific or disagree, the authors' own
configs (`config/e2e/r18_*.yaml`, `config/feat/*.yaml` of their public code). docs/recipe.md lists
every value with its source and the few places where e2epath departs from them, and why.

Precedence, highest first: the method's own keys > its family's `defaults` > the recipe for the
task type and encoder (`E2E_ENCODER_RECIPE` over `E2E_RECIPE`; for `aggregator_kw`, per aggregator
too; two-stage on foundation-model features: `TWOSTAGE_FM_RECIPE`) > the encoder's preset (input
size, weights: `e2epath.presets`) > the generic defaults below. A method's resolved dict carries its
encoder's preset (`encoder_spec`) and the weights it loads (`weights`).
`aggregator_kw`, `augment` and `sampling` merge key by key; everything else is replaced whole. A task's `bag`
unit, `select_on` metric and `oversample` ratio come from the task (`TASK_DEFAULTS` per task type).

The resolved dict is what a training job receives as a plain param, so changing one method's
hyper-parameters reruns only that method's jobs. `python -m e2epath methods --config FILE`
(`e2epath.config.cli`) prints every task × method's resolved dict.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

from e2epath.core.schema import ConfigError
from e2epath.core.vocabulary import FAMILIES, MAIN_METRIC, METRICS
from e2epath.data.sampling import scale_counts
from e2epath.models.presets import EncoderError, check_weights, resolve_encoders

# A task's unit of prediction, its model-selection metric (the metric the paper reports) and the
# oversampling of its training classes: properties of the task's data, the same for every method.
TASK_KEYS = ("bag", "select_on", "oversample")
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"bag": "slide", "select_on": MAIN_METRIC["classification"], "oversample": None},
    "grading": {"bag": "slide", "select_on": MAIN_METRIC["grading"], "oversample": None},
    "survival": {"bag": "case", "select_on": MAIN_METRIC["survival"], "oversample": None},
}

# What no task type changes.
GENERIC: dict[str, Any] = {
    "aggregator_kw": {},
    "input_size": 224,
    "accumulate": 1,
    "workers": 4,
    "eval_chunk": 256,
    "ema": None,
    "patience": None,
    "min_epochs": 0,
    "warmup_epochs": 0,
    "augment": {"hflip": False, "vflip": False, "crop_scale": 0.08, "translate": 0.0},
    "eval_crop": "center",  # evaluate the centre input_size crop of each stored patch (CenterCrop 224 of 256)
    "trainable_blocks": None,  # every encoder block trains
    "grad_checkpointing": False,
}

# End to end, per task type: the authors' ResNet-18 configs (r18_brca_subtyping, r18_panda,
# r18_brca_survival) on top of B.2 / B.3. Sampling: a main magnification (the first; evaluation
# reads it) and a secondary, coarser one whose share is 1 / mul_scale_ratio (4, 4, 10); s = same_psize.
E2E_RECIPE: dict[str, dict[str, Any]] = {
    "classification": {
        "sampling": {"magnifications": [10, 5], "ratios": [0.75, 0.25]},
        "n_instances": 512, "batch_size": 3,
        "augment": {"crop_scale": 0.25},                       # "weak": RandomResizedCrop only
        "optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 75, "warmup_epochs": 10,
        "patience": 10, "min_epochs": 50,
        "ema": 0.9997,                                          # test_type both_ema, default momentum
    },
    "grading": {
        # the paper's PANDA "40x" + "20x" are the scans' full resolution (0.45-0.49 µm/px) and half
        # of it: 20x and 10x in e2epath, which names magnifications by µm per pixel (docs/resolution.md)
        "sampling": {"magnifications": [20, 10], "ratios": [0.75, 0.25]},
        "n_instances": 128, "batch_size": 8,
        "augment": {"hflip": True, "vflip": True},             # "strong": flips + RandomResizedCrop
        "optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200,
        "patience": 20, "min_epochs": 120,
        "ema": 0.9999,
    },
    "survival": {
        "sampling": {"magnifications": [10, 5], "ratios": [0.9, 0.1]},
        "n_instances": 768, "batch_size": 2,
        "optimizer": "adamw", "lr": 8e-5, "weight_decay": 5e-2, "epochs": 30, "warmup_epochs": 5,
        "patience": 10, "min_epochs": 20,
    },
}
# What the authors' ResNet-50 configs change on top (r50_brca_subtyping: s 128 at a 2:1 main:secondary
# split, batch 4, "weak_strong" = a random shift of up to 100/256 then RandomResizedCrop 0.08-1,
# 125 epochs without early stopping before the end; r50_panda: batch 4, AdamW with weight decay
# 1e-2, a 256-d projection, no early stopping before epoch 200). No R50 survival config is
# published: R50 survival runs the task-type recipe above.
E2E_ENCODER_RECIPE: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {
        "resnet50": {"sampling": {"magnifications": [10, 5], "ratios": [2 / 3, 1 / 3]}, "n_instances": 128,
                     "batch_size": 4, "augment": {"crop_scale": 0.08, "translate": 100 / 256},
                     "epochs": 125, "min_epochs": 125},
    },
    "grading": {
        "resnet50": {"batch_size": 4, "optimizer": "adamw", "weight_decay": 1e-2, "min_epochs": 200,
                     "aggregator_kw": {"inner_dim": 256}},
    },
    "survival": {},
}
# Aggregator settings per task type, every ABMILX option the recipe sets spelled out (heads, FFN,
# the attention MLP's bias, attention plus, dropout) so `methods` prints all of it: abx_attn_plus
# true in every config; n_heads 8 and dropout 0.25 are the authors' defaults; inner_dim 256 where
# the configs say so, else their default 512 (grading).
E2E_AGGREGATOR_KW: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {"*": {"inner_dim": 256},
                       "abmilx": {"n_heads": 8, "ffn": False, "attn_bias": False, "attn_plus": True, "dropout": 0.25}},
    "grading": {"*": {"inner_dim": 512},
                "abmilx": {"n_heads": 4, "ffn": True, "attn_bias": False, "attn_plus": True, "dropout": 0.25}},
    "survival": {"*": {"inner_dim": 256},
                 "abmilx": {"n_heads": 8, "ffn": False, "attn_bias": True, "attn_plus": True, "dropout": 0.25}},
}
# Two-stage (B.3 for ResNet-50 features: AdamW, lr 2e-4, no weight decay, 512-d projection; epochs
# and early stopping from the authors' feature configs), full bags, batch size 1.
TWOSTAGE_RECIPE: dict[str, dict[str, Any]] = {
    "classification": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 75,
                       "patience": 20, "min_epochs": 75},
    "grading": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 200,
                "patience": 20, "min_epochs": 100},
    "survival": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 30,
                 "patience": 10, "min_epochs": 30},
}
# On foundation-model features B.3 lowers the learning rate to 1e-4 (every task type).
TWOSTAGE_FM_RECIPE: dict[str, Any] = {"lr": 1e-4}
TWOSTAGE_AGGREGATOR_KW: dict[str, dict[str, dict[str, Any]]] = {
    t: {"*": {"inner_dim": 512}} for t in TWOSTAGE_RECIPE}
# Full bags of frozen features: nothing is sampled, augmented, cropped or averaged.
TWOSTAGE_FIXED = {"batch_size": 1, "augment": None, "eval_crop": None, "ema": None, "sampling": None,
                  "n_instances": None, "input_size": None, "trainable_blocks": None, "grad_checkpointing": False}
MERGED = ("aggregator_kw", "augment", "sampling")


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in MERGED and isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = copy.deepcopy(value)
    return out


def declared_methods(config: dict) -> dict[str, dict[str, Any]]:
    """Every method of the config — its own keys on top of its family's defaults — the sweeps'
    generated ones included, by name, with `family` and `name` set (task-independent)."""
    methods: dict[str, dict[str, Any]] = {}
    for family in FAMILIES:
        section = config[family]
        for name, own in section["methods"].items():
            if name in methods:
                raise ConfigError(f"config: method name {name!r} is used by both e2e and twostage; method "
                                  "names must be unique (they name result folders and table rows)")
            if family == "twostage" and "weights" in {**section["defaults"], **own}:
                raise ConfigError(f"config twostage.methods.{name}: features are shared by all two-stage methods of "
                                  "an encoder; set the weights once, in encoders.<NAME>.weights")
            methods[name] = {**_merge(section["defaults"], own), "family": family, "name": name}
    for sweep, spec in config.get("sweeps", {}).items():
        for name, method in expand_sweep(sweep, spec, methods).items():
            if name in methods:
                raise ConfigError(f"config sweeps.{sweep}: generated method {name!r} exists already")
            methods[name] = method
    for name, spec in methods.items():
        missing = [k for k in ("encoder", "aggregator") if k not in spec and spec["family"] == "e2e"]
        if missing or "aggregator" not in spec:
            raise ConfigError(f"config {spec['family']}.methods.{name}: missing {', '.join(missing or ['aggregator'])}")
    return methods


def _value_name(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "_".join(_value_name(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}{_value_name(v)}" for k, v in sorted(value.items()))
    return str(value)


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep key {path!r}: {key!r} is not a mapping")
    node[leaf] = copy.deepcopy(value)


def expand_sweep(sweep: str, spec: dict[str, Any], methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The methods of one ablation grid: the base method with every combination of the grid's
    values, named ``{sweep}.{key}-{value}...`` (the last part of each dotted key)."""
    base = spec["base"]
    if base not in methods:
        raise ConfigError(f"config sweeps.{sweep}: base method {base!r} is not a method of e2e or twostage")
    keys = list(spec["grid"])
    out = {}
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        method = copy.deepcopy(methods[base])
        parts = [sweep]
        for key, value in zip(keys, values):
            _set_path(method, key, value)
            parts.append(f"{key.split('.')[-1]}-{_value_name(value)}")
        name = ".".join(parts)
        out[name] = {**method, "name": name, "sweep": sweep}
    return out


def _check(name: str, spec: dict[str, Any]) -> None:
    sampling = spec.get("sampling")
    if sampling is not None:
        if len(sampling["magnifications"]) != len(sampling["ratios"]):
            raise ConfigError(f"config method {name!r}: sampling.magnifications and sampling.ratios must have "
                              "the same length")
        if abs(sum(sampling["ratios"]) - 1.0) > 1e-6:
            raise ConfigError(f"config method {name!r}: sampling.ratios must sum to 1 (the paper's eq. 2), got "
                              f"{sum(sampling['ratios']):g}")
        if min(scale_counts(spec["n_instances"], sampling["ratios"])) < 1:
            raise ConfigError(f"config method {name!r}: n_instances {spec['n_instances']} leaves a magnification "
                              f"of {sampling['magnifications']} with no patch; raise n_instances or its ratio")
    if spec["task_type"] == "survival" and spec["oversample"] is not None:
        raise ConfigError("config: oversample is for classification and grading tasks (survival has no classes "
                          "to balance); remove it from the survival task")
    if spec["select_on"] not in METRICS[spec["task_type"]]:
        raise ConfigError(f"config: select_on {spec['select_on']!r} is not a {spec['task_type']} metric "
                          f"({', '.join(METRICS[spec['task_type']])})")


def method_encoder(own: dict[str, Any], twostage: dict[str, Any] | None,
                   encoders: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """A method's encoder preset (as the config changes it) and the weights it loads."""
    name, family = own["name"], own["family"]
    if family == "twostage":
        if twostage is None:
            raise ConfigError(f"method {name!r}: a two-stage method needs the config's twostage section")
        encoder = own.get("encoder", twostage["encoders"][0])
        if encoder not in twostage["encoders"]:
            raise ConfigError(f"config twostage.methods.{name}: encoder {encoder!r} is not in twostage.encoders "
                              f"{twostage['encoders']}; add it there (its features are extracted once for all methods)")
    else:
        encoder = own["encoder"]
    if encoder not in encoders:
        raise ConfigError(f"config method {name!r}: encoder {encoder!r} is neither a preset nor in the config's "
                          f"encoders section; presets and yours: {', '.join(encoders)} (`python -m e2epath encoders`)")
    enc = encoders[encoder]
    weights = own.get("weights", enc["weights"])
    try:
        check_weights(enc, weights, f"config method {name!r}")
    except EncoderError as err:
        raise ConfigError(str(err)) from err
    if weights != enc["weights"] and isinstance(weights, str) and weights.startswith("hf:"):
        raise ConfigError(f"config method {name!r}: Hugging Face weights belong to the encoder: set them in "
                          f"encoders.{encoder}.weights")
    return enc, weights


def job_encoder_spec(enc: dict[str, Any]) -> dict[str, Any]:
    """What a job needs of an encoder preset (not its weights, licence or source: the weights are
    the method's own key, and prose must not rerun jobs)."""
    return {k: v for k, v in enc.items() if k not in ("weights", "licence", "source")}


def resolve_method(own: dict[str, Any], task: dict[str, Any], twostage: dict[str, Any] | None = None,
                   encoders: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One method's hyper-parameters for one task. `own` is the declared method (its keys over its
    family's defaults, with `family` and `name`); `task` the task's config (`type`, `n_bins`, and
    optionally `bag`, `select_on`, `oversample`); `twostage` the config's `twostage` section (encoders,
    magnification) for two-stage methods; `encoders` the presets with the config's changes
    (`presets.resolve_encoders`; default: the presets as they are)."""
    task_type = task["type"]
    task_keys = {**TASK_DEFAULTS[task_type], **{k: task[k] for k in TASK_KEYS if k in task},
                 "task_type": task_type}
    if task_type == "survival":  # only survival has time bins; other tasks' jobs do not depend on them
        task_keys["n_bins"] = task["n_bins"]  # the schema's default fills it in
    name, family = own["name"], own["family"]
    enc, weights = method_encoder(own, twostage, resolve_encoders({}) if encoders is None else encoders)
    preset = {"input_size": enc["input_size"]}
    if family == "e2e":
        recipe, kw = E2E_RECIPE[task_type], E2E_AGGREGATOR_KW[task_type]
        by_encoder = E2E_ENCODER_RECIPE[task_type].get(enc["name"], {})
    else:
        recipe, kw = TWOSTAGE_RECIPE[task_type], TWOSTAGE_AGGREGATOR_KW[task_type]
        by_encoder = TWOSTAGE_FM_RECIPE if enc["foundation"] else {}
        own = {**own, "eval_magnification": twostage["magnification"]}
    agg_kw = {**kw.get("*", {}), **kw.get(own["aggregator"], {})}
    spec = _merge(GENERIC, preset, recipe, {"aggregator_kw": agg_kw}, by_encoder, own, task_keys)
    spec.update(encoder=enc["name"], weights=weights, encoder_spec=job_encoder_spec(enc))
    if family == "twostage":
        spec.update(TWOSTAGE_FIXED)
    elif "eval_magnification" not in own:
        spec["eval_magnification"] = spec["sampling"]["magnifications"][0]  # the main scale
    spec.pop("sweep", None)
    _check(name, spec)
    return spec


def resolve(config: dict) -> dict[str, dict[str, dict[str, Any]]]:
    """task → method → the hyper-parameters its training jobs receive."""
    methods = declared_methods(config)
    try:
        encoders = resolve_encoders(config)
    except EncoderError as err:
        raise ConfigError(str(err)) from err
    return {task: {name: resolve_method(own, tcfg, config["twostage"], encoders) for name, own in methods.items()}
            for task, tcfg in config["tasks"].items()}


def feature_encoders(config: dict) -> dict[str, dict[str, Any]]:
    """The encoders of twostage.encoders as their features are extracted: preset with the
    config's changes (weights included), by name."""
    try:
        encoders = resolve_encoders(config)
    except EncoderError as err:
        raise ConfigError(str(err)) from err
    out = {}
    for name in config["twostage"]["encoders"]:
        if name not in encoders:
            raise ConfigError(f"config twostage.encoders: {name!r} is neither a preset nor in the config's encoders "
                              f"section; presets and yours: {', '.join(encoders)}")
        try:
            check_weights(encoders[name], encoders[name]["weights"], f"config encoders.{name}")
        except EncoderError as err:
            raise ConfigError(str(err)) from err
        out[name] = encoders[name]
    return out


def magnifications_used(spec: dict[str, Any]) -> list[int]:
    """Magnifications a method reads: its sampling scales plus the evaluation one."""
    mags = set(spec["sampling"]["magnifications"]) if spec.get("sampling") else set()
    mags.add(spec["eval_magnification"])
    return sorted(mags)
