"""Resolve each configured method's hyper-parameters; the one owner of method defaults.

Precedence: the method's own keys > the family's `defaults` > the paper's per-task-type values
(appendix B.3 of W. Tang et al., "Revisiting End-to-End Learning with Slide-level Supervision in
Computational Pathology", NeurIPS 2025, arXiv:2506.02408) > the generic defaults below. The
resolved dict is what a training job receives as a plain param, so changing one method's
hyper-parameters reruns only that method's jobs.
"""
from __future__ import annotations

from typing import Any

GENERIC: dict[str, Any] = {
    "weights": "auto",  # ImageNet from the torch cache when present, else random init (logged)
    "aggregator_kw": {},
    "n_instances": 512,
    "sampling": {"magnifications": [10, 20], "ratios": [0.5, 0.5]},
    "eval_magnification": 10,
    "input_size": 224,
    "warmup_epochs": 1,
    "batch_size": 1,
    "accumulate": 1,
    "patience": None,
    "workers": 4,
    "eval_chunk": 256,
    "oversample": True,
}

# The paper, B.3: end-to-end per task type.
E2E_PAPER: dict[str, dict[str, Any]] = {
    "grading": {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200},
    "classification": {"optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 75},
    "survival": {"optimizer": "adamw", "lr": 8e-5, "weight_decay": 5e-2, "epochs": 30},
}
# The paper, B.3: two-stage (ResNet-50 features), full bags, batch size 1.
TWOSTAGE_PAPER: dict[str, dict[str, Any]] = {
    "grading": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 200},
    "classification": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 75},
    "survival": {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 75},
}


def resolve_methods(config: dict) -> dict[str, dict[str, Any]]:
    """Every E2E and two-stage method with its family's defaults merged in (task-independent)."""
    methods: dict[str, dict[str, Any]] = {}
    ts = config["twostage"]
    shared_ts = {k: ts[k] for k in ("encoder", "weights", "input_size", "batch_size")}
    shared_ts["eval_magnification"] = ts["magnification"]
    families = {"e2e": (config["e2e"], {}), "twostage": (config["twostage"], shared_ts)}
    for family, (section, shared) in families.items():
        for name, own in section["methods"].items():
            if name in methods:
                raise ValueError(f"config: method name {name!r} is used by both e2e and twostage; "
                                 "method names must be unique (they name result folders and table rows)")
            spec = {**section["defaults"], **shared, **own, "family": family, "name": name}
            if family == "twostage" and "encoder" in own:
                raise ValueError(f"config twostage.methods.{name}: set the encoder once in "
                                 "twostage.encoder (features are shared by all two-stage methods)")
            missing = [k for k in ("encoder", "aggregator") if k not in spec]
            if missing:
                raise ValueError(f"config {family}.methods.{name}: missing {', '.join(missing)}")
            _check_sampling(name, spec)
            methods[name] = spec
    return methods


def _check_sampling(name: str, spec: dict[str, Any]) -> None:
    sampling = spec.get("sampling")
    if sampling and len(sampling["magnifications"]) != len(sampling["ratios"]):
        raise ValueError(f"config method {name!r}: sampling.magnifications and sampling.ratios "
                         "must have the same length")
    if sampling and abs(sum(sampling["ratios"]) - 1.0) > 1e-6:
        raise ValueError(f"config method {name!r}: sampling.ratios must sum to 1 (the paper's eq. 2), "
                         f"got {sum(sampling['ratios']):g}")


def with_task_defaults(spec: dict[str, Any], task_type: str, n_bins: int = 4) -> dict[str, Any]:
    """Fill what the method left out from the paper's per-task-type values, then generic ones."""
    paper = (E2E_PAPER if spec["family"] == "e2e" else TWOSTAGE_PAPER)[task_type]
    out = {**GENERIC, **paper, **spec, "task_type": task_type, "n_bins": n_bins}
    if spec["family"] == "twostage":
        out["batch_size"] = 1  # full bags of different lengths (paper B.3)
    return out


def magnifications_used(spec: dict[str, Any]) -> list[int]:
    """Magnifications a method reads: its sampling scales plus the evaluation one."""
    mags = set(spec.get("sampling", GENERIC["sampling"])["magnifications"]) if spec["family"] == "e2e" else set()
    mags.add(spec.get("eval_magnification", GENERIC["eval_magnification"]))
    return sorted(mags)
