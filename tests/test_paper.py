"""The reproduction configs (config/paper/*.yaml) resolve to the published recipe, and plan.

The tables below are written from the paper (W. Tang et al., NeurIPS 2025, arXiv:2506.02408:
B.1-B.3, Table 9) and the authors' published configs (`config/e2e/r18_brca_subtyping.yaml`,
`r50_brca_subtyping.yaml`, `r18_panda.yaml`, `r50_panda.yaml`, `r18_brca_survival.yaml`,
`config/feat/fm_*.yaml`, and the defaults of their `options.py`), not from e2epath's code: each
number is the config's value, and the patch counts are s − s // mul_scale_ratio and
s // mul_scale_ratio worked out by hand. `python -m e2epath methods --config FILE` must print them.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from e2epath.config import cli
from e2epath.config.resolve import load_config
from helpers import ROOT

PAPER = ROOT / "config" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))

ABMILX = {"attn_plus": True, "dropout": 0.25}  # abx_attn_plus: true everywhere; dropout default 0.25

# (task type, encoder) → the published E2E recipe. `counts`: patches per training bag per
# magnification (main, then secondary); PANDA's "40x" / "20x" are e2epath's 20x / 10x (0.5 and 1 µm/px).
E2E = {
    ("classification", "resnet18"): {  # r18_brca_subtyping.yaml
        "n_instances": 512, "counts": {10: 384, 5: 128}, "batch_size": 3, "warmup_epochs": 10,
        "augment": {"hflip": False, "vflip": False, "crop_scale": 0.25, "translate": 0.0},  # weak, crop_scale 0.25
        "optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 75, "patience": 10, "min_epochs": 50,
        "ema": 0.9997,  # test_type both_ema, mm default 0.9997
        "abmilx": {"inner_dim": 256, "n_heads": 8, "ffn": False, "attn_bias": False, **ABMILX},
    },
    ("classification", "resnet50"): {  # r50_brca_subtyping.yaml: same_psize 128, mul_scale_ratio 3
        "n_instances": 128, "counts": {10: 86, 5: 42}, "batch_size": 4, "warmup_epochs": 10,
        "augment": {"hflip": False, "vflip": False, "crop_scale": 0.08, "translate": 100 / 256},  # weak_strong
        "optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 125, "patience": 10, "min_epochs": 125,
        "ema": 0.9997,
        "abmilx": {"inner_dim": 256, "n_heads": 8, "ffn": False, "attn_bias": False, **ABMILX},
    },
    ("grading", "resnet18"): {  # r18_panda.yaml: options.py defaults adam, lr 2e-4, wd 1e-5, inner_dim 512
        "n_instances": 128, "counts": {20: 96, 10: 32}, "batch_size": 8, "warmup_epochs": 0,
        "augment": {"hflip": True, "vflip": True, "crop_scale": 0.08, "translate": 0.0},  # strong
        "optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200, "patience": 20, "min_epochs": 120,
        "ema": 0.9999,
        "abmilx": {"inner_dim": 512, "n_heads": 4, "ffn": True, "attn_bias": False, **ABMILX},
    },
    ("grading", "resnet50"): {  # r50_panda.yaml: batch 4, adamw, wd 1e-2, inner_dim 256, max_epoch 200
        "n_instances": 128, "counts": {20: 96, 10: 32}, "batch_size": 4, "warmup_epochs": 0,
        "augment": {"hflip": True, "vflip": True, "crop_scale": 0.08, "translate": 0.0},
        "optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-2, "epochs": 200, "patience": 20, "min_epochs": 200,
        "ema": 0.9999,
        "abmilx": {"inner_dim": 256, "n_heads": 4, "ffn": True, "attn_bias": False, **ABMILX},
    },
    ("survival", "resnet18"): {  # r18_brca_survival.yaml: same_psize 768, mul_scale_ratio 10, no EMA
        "n_instances": 768, "counts": {10: 692, 5: 76}, "batch_size": 2, "warmup_epochs": 5,
        "augment": {"hflip": False, "vflip": False, "crop_scale": 0.08, "translate": 0.0},  # weak, default crop
        "optimizer": "adamw", "lr": 8e-5, "weight_decay": 5e-2, "epochs": 30, "patience": 10, "min_epochs": 20,
        "ema": None,
        "abmilx": {"inner_dim": 256, "n_heads": 8, "ffn": False, "attn_bias": True, **ABMILX},  # abx_attn_bias
    },
}
E2E["survival", "resnet50"] = E2E["survival", "resnet18"]  # no R50 survival config is published
COMMON_E2E = {"weights": "imagenet", "input_size": 224, "eval_crop": "center"}  # ImageNet R18/R50; CenterCrop 224

# Two-stage on ResNet-50 ImageNet features at 20x (B.2), full bags, batch 1; AdamW, lr 2e-4, no
# weight decay, a 512-d projection (B.3); epochs, patience and max_epoch from config/feat/fm_*.yaml.
TWOSTAGE = {
    "classification": {"epochs": 75, "patience": 20, "min_epochs": 75},
    "grading": {"epochs": 200, "patience": 20, "min_epochs": 100},
    "survival": {"epochs": 30, "patience": 10, "min_epochs": 30},
}
COMMON_TWOSTAGE = {"encoder": "resnet50", "weights": "imagenet", "eval_magnification": 20, "batch_size": 1,
                   "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "ema": None}

# Per benchmark: its task (type, bag unit, selection metric = the paper's metric, oversampling) and
# splits (B.1: PANDA 7:1:2, the others 7:3 train:test; survival: the authors' 3-fold CV).
TASKS = {
    "tcga_brca_subtype": ("subtype", "classification", "slide", "auc", 2.0),  # IDC:ILC 2:1 (B.1)
    "tcga_brca_subtype_ablation": ("subtype", "classification", "slide", "auc", 2.0),
    "tcga_nsclc_subtype": ("subtype", "classification", "slide", "auc", None),
    "camelyon": ("metastasis", "classification", "slide", "auc", None),
    "panda": ("isup", "grading", "slide", "accuracy", None),
    "tcga_luad_survival": ("survival", "survival", "case", "c_index", None),
    "tcga_brca_survival": ("survival", "survival", "case", "c_index", None),
    "tcga_blca_survival": ("survival", "survival", "case", "c_index", None),
}
BASELINES = {"r18_abmilx": ("resnet18", "abmilx"), "r50_abmilx": ("resnet50", "abmilx"),
             "r18_abmil": ("resnet18", "abmil"), "r18_transmil": ("resnet18", "transmil"),
             "r18_dsmil": ("resnet18", "dsmil")}
TWOSTAGE_METHODS = {"ts_r50_abmil": "abmil", "ts_r50_transmil": "transmil", "ts_r50_dsmil": "dsmil",
                    "ts_r50_abmilx": "abmilx"}
# The paper's foundation-model baselines (Tables 1, 2, 8: UNI with ABMIL and TransMIL, GigaPath with
# ABMIL): B.3 changes the learning rate to 1e-4 for FM features; weights from the model cards' hub
# repositories (UNI: MahmoodLab/UNI, Prov-GigaPath: prov-gigapath/prov-gigapath, pytorch_model.bin).
FM_METHODS = {"ts_uni_abmil": ("uni", "abmil", "hf:MahmoodLab/UNI/pytorch_model.bin", 1024),
              "ts_uni_transmil": ("uni", "transmil", "hf:MahmoodLab/UNI/pytorch_model.bin", 1024),
              "ts_gigapath_abmil": ("gigapath", "abmil", "hf:prov-gigapath/prov-gigapath/pytorch_model.bin", 1536)}


def resolved(config: Path, capsys) -> dict:
    assert cli.methods(["--config", str(config)]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_benchmark_of_the_paper_has_a_config():
    assert {c.stem for c in CONFIGS} == set(TASKS)


@pytest.mark.parametrize("config", [c for c in CONFIGS if "ablation" not in c.stem], ids=lambda c: c.stem)
def test_methods_print_the_published_recipe(config, capsys):
    out = resolved(config, capsys)
    name, task_type, bag, select_on, oversample = TASKS[config.stem]
    assert list(out) == [name]
    specs = out[name]
    assert set(specs) == set(BASELINES) | set(TWOSTAGE_METHODS) | set(FM_METHODS)
    for method, (encoder, aggregator) in BASELINES.items():
        spec, want = specs[method], E2E[task_type, encoder]
        assert (spec["family"], spec["encoder"], spec["aggregator"]) == ("e2e", encoder, aggregator)
        assert (spec["bag"], spec["select_on"], spec["oversample"]) == (bag, select_on, oversample), method
        for key, value in {**COMMON_E2E, **want}.items():
            if key == "counts":
                mags, ratios = spec["sampling"]["magnifications"], spec["sampling"]["ratios"]
                counts = {m: int(spec["n_instances"] * r + 1e-9) for m, r in zip(mags[1:], ratios[1:])}
                counts = {mags[0]: spec["n_instances"] - sum(counts.values()), **counts}
                assert counts == value and list(counts) == list(value), (method, counts)
                assert spec["eval_magnification"] == mags[0]  # evaluation reads the main scale
            elif key == "abmilx":
                expected = value if aggregator == "abmilx" else {"inner_dim": value["inner_dim"]}
                assert spec["aggregator_kw"] == expected, method
            elif isinstance(value, float):
                assert spec[key] == pytest.approx(value, rel=1e-12), (method, key)
            else:
                assert spec[key] == value, (method, key)
        if task_type == "survival":
            assert spec["n_bins"] == 4  # n_classes 4
    for method, aggregator in TWOSTAGE_METHODS.items():
        spec = specs[method]
        assert (spec["family"], spec["aggregator"], spec["bag"]) == ("twostage", aggregator, bag)
        for key, value in {**COMMON_TWOSTAGE, **TWOSTAGE[task_type]}.items():
            assert spec[key] == value, (method, key)
        assert spec["aggregator_kw"] == {"inner_dim": 512}
    for method, (encoder, aggregator, weights, dim) in FM_METHODS.items():
        spec = specs[method]
        assert (spec["family"], spec["encoder"], spec["aggregator"], spec["weights"]) == \
            ("twostage", encoder, aggregator, weights)
        for key, value in {**COMMON_TWOSTAGE, **TWOSTAGE[task_type], "encoder": encoder, "weights": weights,
                           "lr": 1e-4}.items():
            assert spec[key] == value, (method, key)
        assert spec["encoder_spec"]["dim"] == dim and spec["encoder_spec"]["input_size"] == 224
        assert spec["aggregator_kw"] == {"inner_dim": 512}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_splits_are_the_papers_and_never_select_on_test(config):
    cfg = load_config(config)
    splits = cfg["splits"]
    if config.stem == "panda":
        assert splits == {"mode": "holdout", "holdout": [0.7, 0.1, 0.2], "k": 5, "val_fraction": 0.2}
    elif "survival" in config.stem:
        assert (splits["mode"], splits["k"], splits["val_fraction"]) == ("kfold", 3, 0.125)
    else:  # 7:3, validation = 1/8 of the training share (the authors' val_ratio 0.125)
        train, val, test = splits["holdout"]
        assert splits["mode"] == "holdout" and test == pytest.approx(0.3)
        assert val / (train + val) == pytest.approx(0.125) and train + val + test == pytest.approx(1)


def test_the_ablation_grids_are_table_9(capsys):
    specs = resolved(PAPER / "tcga_brca_subtype_ablation.yaml", capsys)["subtype"]
    base = specs["r18_abmilx"]
    grids = {"ffn": ("aggregator_kw", "ffn", [False, True]),
             "dim": ("aggregator_kw", "inner_dim", [128, 256, 384, 512]),
             "heads": ("aggregator_kw", "n_heads", [1, 2, 4, 8, 16]),
             "ratio": ("sampling", "ratios", [[0.5, 0.5], [0.75, 0.25], [0.9, 0.1]]),
             "s": (None, "n_instances", [128, 256, 384, 512, 768, 1280])}
    expected = {"r18_abmilx", "r18_abmilx_single_scale"}
    for sweep, (parent, key, values) in grids.items():
        for value in values:
            shown = "_".join(map(str, value)) if isinstance(value, list) else str(value).lower()
            name = f"{sweep}.{key}-{shown}"
            expected.add(name)
            spec = specs[name]
            want = json.loads(json.dumps(base))
            (want[parent] if parent else want)[key] = value
            want["name"] = name
            assert spec == want, name
    assert set(specs) == expected
    assert specs["r18_abmilx_single_scale"]["sampling"] == {"magnifications": [10], "ratios": [1.0]}


def test_methods_command_runs_as_users_run_it():
    res = subprocess.run([sys.executable, "-m", "e2epath", "methods", "--config", str(PAPER / "panda.yaml"),
                          "--method", "r18_abmilx"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)["isup"]["r18_abmilx"]
    assert spec["sampling"] == {"magnifications": [20, 10], "ratios": [0.75, 0.25]}
    bad = subprocess.run([sys.executable, "-m", "e2epath", "methods", "--config", str(ROOT / "missing.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


# ------------------------------------------------------------------ planning on a small fake sheet

def fake_run(run: Path, cfg: dict, n_cases: int = 24) -> int:
    """A sheet of empty slide files (a dry run opens none) and labels for each task; returns slides."""
    (run / "slides").mkdir(parents=True)
    rows = []
    for c in range(n_cases):
        for s in range(1 + (c % 3 == 0)):  # every third case has two slides
            slide = f"CASE-{c:02d}-S{s}"
            (run / "slides" / f"{slide}.svs").write_bytes(b"")
            rows.append({"slide_id": slide, "path": f"slides/{slide}.svs", "case_id": f"CASE-{c:02d}"})
    pd.DataFrame(rows).to_csv(run / cfg["samples"], sep="\t", index=False)
    cases = [f"CASE-{c:02d}" for c in range(n_cases)]
    for task in cfg["tasks"].values():
        path = run / task["labels"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if task["type"] == "survival":
            table = pd.DataFrame({"case_id": cases, "time": [100 + 10 * i for i in range(n_cases)],
                                  "event": [i % 2 for i in range(n_cases)]})
        else:
            classes = ["0", "1", "2", "3", "4", "5"] if task["type"] == "grading" else ["A", "B"]
            table = pd.DataFrame({"case_id": cases, "label": [classes[i % len(classes)] for i in range(n_cases)]})
        table.to_csv(path, index=False)
    return len(rows)


# What each paper config plans, counted by hand from the config files (not from e2epath): E2E and
# two-stage methods, folds (holdout: 1), magnifications patched, encoder checkpoints recorded before
# training (ResNet-18 / -50 ImageNet, UNI and Prov-GigaPath from the Hugging Face cache), and the
# encoders whose features are extracted (those two-stage methods use). The ablation config: 2 methods
# and the Table 9 sweeps (2 + 4 + 5 + 3 + 6 values), no two-stage method.
PLANS = {  # config: (E2E methods, two-stage methods, folds, magnifications, weights records, feature encoders)
    "camelyon": (5, 7, 1, 3, 4, 3),
    "panda": (5, 7, 1, 2, 4, 3),
    "tcga_blca_survival": (5, 7, 3, 3, 4, 3),
    "tcga_brca_subtype": (5, 7, 1, 3, 4, 3),
    "tcga_brca_subtype_ablation": (22, 0, 1, 3, 1, 0),
    "tcga_brca_survival": (5, 7, 3, 3, 4, 3),
    "tcga_luad_survival": (5, 7, 3, 3, 4, 3),
    "tcga_nsclc_subtype": (5, 7, 1, 3, 4, 3),
}


@pytest.mark.workflow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_snakemake_plans_every_paper_config(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    n_slides = fake_run(tmp_path, cfg)
    # config/paper/README.md's command, from the repository: `snakemake all --configfile
    # config/paper/X.yaml --directory RUN` (-n: plan only)
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "all", "--configfile",
                          str(config.relative_to(ROOT)), "--directory", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout.split("Job stats:")[1].split("Reasons:")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    n_e2e, n_ts, folds, n_mags, n_records, n_feature_encoders = PLANS[config.stem]
    assert jobs["train_e2e"] == n_e2e * folds and jobs.get("train_twostage", 0) == n_ts * folds
    assert jobs["patch"] == n_slides * n_mags
    assert jobs["encoder_weights"] == n_records  # one record per encoder and weights, before any training
    assert jobs.get("extract_features", 0) == n_slides * n_feature_encoders  # one job per slide and encoder
