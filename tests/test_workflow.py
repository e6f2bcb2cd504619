"""Real `snakemake` processes on a tiny demo cohort in a temporary run directory.

One full `all` run (module fixture), then dry runs against it prove that only what changed is
rerun, and that the report and lint work from a clone run elsewhere (`-s … --directory …`).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import tiny_run
from e2epath.core.layout import RUN_DIR
from helpers import ROOT, tiny_config
from tiny_run import BAD

pytestmark = pytest.mark.workflow

TINY = tiny_config()
N_SLIDES, FOLDS = TINY["demo"]["n_slides"], TINY["splits"]["k"]


def snakemake(run: Path, config: dict, *args: str, timeout: int = 1500,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cfg = run / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return tiny_run.snakemake(run, *args, config=cfg, timeout=timeout, env=env)


def planned(run: Path, config: dict) -> dict[str, int]:
    """Jobs a dry run of `all` would execute, by rule."""
    res = snakemake(run, config, "-n", "all")
    assert res.returncode == 0, res.stdout + res.stderr
    if "Nothing to be done" in res.stdout + res.stderr:
        return {}
    table = res.stdout.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] not in ("total", "all")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The tiny run (tests/tiny_run.py): the one CI built with README command 1's environment
    (E2EPATH_TINY_RUN), or a new one. Tests that change it put it back as they found it."""
    given = os.environ.get("E2EPATH_TINY_RUN")
    if given:
        return Path(given)
    run = tmp_path_factory.mktemp("run")
    tiny_run.build(run)
    return run


def edited(**changes) -> dict:
    config = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        node = config
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def test_all_builds_every_stage(run):
    qc = pd.read_csv(run / "results/slides.tsv", sep="\t").set_index("slide_id")
    assert len(qc) == N_SLIDES + len(BAD)
    assert (qc.drop(index=list(BAD))["status"] == "ok").all()
    assert {"aperio", "generic-tiff"} <= set(qc["vendor"])
    manifest = pd.read_csv(run / "results/patches/manifest.tsv", sep="\t")
    assert len(manifest) == (N_SLIDES + len(BAD)) * 3
    good = manifest[~manifest["slide_id"].isin(list(BAD))]
    assert (good.loc[good["magnification"] == 10, "n_patches"] > 0).all()
    for task in ("subtype", "survival"):
        metrics = pd.read_csv(run / f"results/metrics/{task}.tsv", sep="\t")
        assert set(metrics["method"]) == {"r18_abmilx", "r18_mean", "ts_abmil"}
        assert {"0", "1", "pooled"} <= set(metrics["fold"].astype(str))
        assert (run / f"results/tables/{task}.md").stat().st_size > 0
        assert list((run / f"results/figures/{task}").glob("*.png"))
    for path in (run / "results/e2e/subtype/r18_abmilx").glob("fold*/predictions.tsv"):
        preds = pd.read_csv(path, sep="\t")
        assert {"case_id", "label", "prob_negative", "prob_positive"} <= set(preds.columns)
    from e2epath.core.layout import Run

    runs = [Run.read(p) for p in (run / "results").glob("*/*/*/fold*/run.json")]  # each run names itself
    assert len(runs) == 2 * 3 * FOLDS
    # an attention map of every test slide with patches, for every method but mean pooling
    assert sorted(p.relative_to(run / "results/maps").as_posix() for p in (run / "results/maps").glob("*/*")) == \
        sorted(f"{t}/{m}" for t in ("subtype", "survival") for m in ("r18_abmilx", "ts_abmil"))
    index = pd.read_csv(run / "results/maps/subtype/r18_abmilx/index.tsv", sep="\t")
    assert sorted(index["slide_id"]) == sorted(set(qc.index) - set(BAD)) and (index["status"] == "ok").all()
    for slide in index["slide_id"]:
        for suffix in (".attention.png", ".montage.png", ".attention.geojson"):
            assert (run / f"results/maps/subtype/r18_abmilx/{slide}{suffix}").stat().st_size > 0
    assert {(r.family, r.method) for r in runs} == {("e2e", "r18_abmilx"), ("e2e", "r18_mean"), ("twostage", "ts_abmil")}
    assert all(r.folder == run / f"results/{r.family}/{r.task}/{r.method}/fold{r.fold}" for r in runs)


def test_bad_slides_fail_alone_with_the_openslide_error(run):
    qc = pd.read_csv(run / "results/slides.tsv", sep="\t").set_index("slide_id")
    for slide in BAD:
        assert qc.loc[slide, "status"] == "failed"
        assert isinstance(qc.loc[slide, "error"], str) and len(qc.loc[slide, "error"]) > 10
    manifest = pd.read_csv(run / "results/patches/manifest.tsv", sep="\t")
    bad = manifest[manifest["slide_id"].isin(list(BAD))]
    assert set(bad["status"]) == {"failed"} and (bad["n_patches"] == 0).all()
    log = (run / "results/logs/train_e2e/subtype/r18_abmilx/fold0.log").read_text()
    for slide in BAD:  # their cases are in every fold: training says why it skips them
        assert re.search(rf"skip slide {slide}\b", log), slide


def test_second_run_does_nothing(run):
    assert planned(run, TINY) == {}


def test_every_job_wrote_its_log(run):
    logs = list((run / "results/logs").rglob("*.log"))
    assert len(logs) >= (N_SLIDES + len(BAD)) * 5
    assert all(p.stat().st_size > 0 for p in logs)


def test_adding_a_magnification_runs_only_its_jobs(run):
    jobs = planned(run, edited(preprocess__magnifications=[5, 10, 20, 40]))
    assert jobs.pop("patch") == N_SLIDES + len(BAD)
    assert jobs.pop("manifest") == 1
    assert set(jobs) <= {"figures_qc"}, jobs  # nothing else: no QC, tissue, features, training


def test_changing_segmentation_redoes_tissue_and_patches_only_upstream(run):
    jobs = planned(run, edited(preprocess__tissue={"preset": "biopsy", "seg_mpp": 6.0}))
    assert jobs["tissue"] == N_SLIDES + len(BAD) and jobs["patch"] == (N_SLIDES + len(BAD)) * 3
    assert jobs["manifest"] == 1
    assert "slide_qc" not in jobs and "demo_cohort" not in jobs and "qc_table" not in jobs


def test_changing_one_method_reruns_only_its_jobs(run):
    config = edited()
    config["e2e"]["methods"]["r18_mean"]["epochs"] = 3
    jobs = planned(run, config)
    assert jobs.pop("train_e2e") == 2 * FOLDS  # r18_mean only, both tasks
    assert set(jobs) <= {"evaluate", "tables", "figures_task"}, jobs


def test_changing_the_feature_encoder_reruns_twostage_but_not_e2e(run):
    config = edited(twostage__encoders=["resnet50"])
    config["encoders"]["resnet50"] = {"weights": None, "input_size": 32}
    jobs = planned(run, config)
    assert jobs.pop("extract_features") == N_SLIDES + len(BAD)
    assert jobs.pop("train_twostage") == 2 * FOLDS
    assert "train_e2e" not in jobs and "patch" not in jobs
    # one setting of the encoder's preset (its normalisation) redoes its features, nothing upstream
    config = edited()
    config["encoders"]["resnet18"]["mean"] = [0.7, 0.6, 0.7]
    jobs = planned(run, config)
    assert jobs.pop("extract_features") == N_SLIDES + len(BAD) and "patch" not in jobs


def test_adding_a_slide_runs_only_its_jobs_and_aggregates(run):
    demo = run / "resources/demo"
    shutil.copy(demo / "slides/DEMO-S001.svs", demo / "slides/EXTRA-1.svs")
    sheet = pd.read_csv(demo / "slides.tsv", sep="\t", dtype=str)
    extra = pd.concat([sheet, pd.DataFrame([{"slide_id": "EXTRA-1", "path": "slides/EXTRA-1.svs",
                                             "case_id": sheet.loc[0, "case_id"]}])])
    extra.to_csv(demo / "extra.tsv", sep="\t", index=False)
    jobs = planned(run, edited(samples="resources/demo/extra.tsv"))
    assert jobs["slide_qc"] == 1 and jobs["tissue"] == 1 and jobs["patch"] == 3
    assert jobs["qc_table"] == 1 and jobs["manifest"] == 1 and jobs["extract_features"] == 1


def job_resources(run: Path, config: dict) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(rule, wildcards, resources) of every job of `all` (dry run, --forceall)."""
    res = snakemake(run, config, "-n", "--forceall", "all")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", res.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            fields = {k: dict(kv.split("=", 1) for kv in v.split(", "))
                      for k, v in re.findall(r"^\s+(wildcards|resources): (.*)$", block, re.M)}
            jobs.append((rule[1], fields.get("wildcards", {}), fields.get("resources", {})))
    return jobs


def test_a_shard_job_asks_for_its_slides_time_and_every_job_for_memory(run, sharded):
    """A shard job's time limit is the per-slide job's times its slides: one number per step."""
    from e2epath.preprocess.shards import assign

    per_slide = {}
    for rule, _, resources in job_resources(run, TINY):
        if rule == "all":
            continue
        assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0, rule
        per_slide.setdefault(rule, set()).add(int(resources["runtime"]))
    slides = pd.read_csv(sharded / "resources/demo/slides.tsv", sep="\t")["slide_id"]
    members = assign(slides, SHARDED["preprocess"]["shards"])
    checked = set()
    for rule, wildcards, resources in job_resources(sharded, SHARDED):
        if rule.endswith("_shard"):
            (minutes,) = per_slide[rule.removesuffix("_shard")]
            assert int(resources["runtime"]) == minutes * len(members[wildcards["shard"]]), (rule, wildcards)
            checked.add(rule)
    assert checked == SHARD_RULES


def gpu_requests(run: Path, gpus: str) -> dict[str, set[int]]:
    """The `gpu` resource of every job of `all` (dry run) on a host with ``gpus`` (fake) GPUs."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["E2EPATH_GPU_COUNT"] = gpus
    res = snakemake(run, TINY, "-n", "--forceall", "all", "--cores", "2", "--resources", "gpu=1", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    requests: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", res.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            gpu = re.search(r"^\s+resources:.*\bgpu=(\d+)", block, re.M)
            requests.setdefault(rule[1], set()).add(int(gpu[1]) if gpu else 0)
    return requests


@pytest.mark.parametrize("gpus", ["0", "2"])
def test_gpu_rules_ask_for_a_gpu_only_where_there_is_one(run, gpus):
    """On a CPU-only host `--resources gpu=1` must not make CPU training run one job at a time."""
    requests = gpu_requests(run, gpus)
    gpu_rules = {"train_e2e", "extract_features", "train_twostage"}
    assert gpu_rules <= set(requests)
    for rule, values in requests.items():
        assert values == ({1} if rule in gpu_rules and gpus != "0" else {0}), (rule, values)


def test_report_has_every_figure(run):
    res = snakemake(run, TINY, "--report", str(run / "results/report.html"))
    assert res.returncode == 0, res.stderr[-3000:]
    html = (run / "results/report.html").read_text(errors="replace")
    figures = sorted(p.name for p in (run / "results/figures").rglob("*.png"))
    assert figures
    for name in figures:
        assert name in html, name


def test_lint_is_clean():
    res = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- preprocess.shards > 0

SHARDED = edited(preprocess__shards=3)
SHARD_RULES = {"slide_qc_shard", "tissue_shard", "patch_shard", "extract_features_shard"}


@pytest.fixture(scope="module")
def sharded(run, tmp_path_factory) -> Path:
    """The per-slide run's cohort (bad slides included) run again with one job per shard and step."""
    sharded = tmp_path_factory.mktemp("sharded")
    shutil.copytree(run / "resources/demo", sharded / "resources/demo")
    res = snakemake(sharded, SHARDED, "--cores", "2", "all")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    stats = res.stdout.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in res.stdout else res.stderr
    ran = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    assert {r: ran.get(r) for r in SHARD_RULES} == {"slide_qc_shard": 3, "tissue_shard": 3, "patch_shard": 9,
                                                     "extract_features_shard": 3}, ran
    assert not {"slide_qc", "tissue", "patch", "extract_features"} & set(ran), ran
    return sharded


def table(root: Path, rel: str, keys: list[str]) -> pd.DataFrame:
    """A TSV of a run, rows sorted, the run's own folder written as ROOT (slide paths, errors)."""
    text = (root / rel).read_text().replace(str(root), "ROOT")
    return pd.read_csv(io.StringIO(text), sep="\t").sort_values(keys).reset_index(drop=True)


def test_sharded_run_gives_the_per_slide_results(run, sharded):
    for rel, keys in (("results/slides.tsv", ["slide_id"]), ("results/patches/manifest.tsv", ["slide_id", "magnification"])):
        pd.testing.assert_frame_equal(table(run, rel, keys), table(sharded, rel, keys), obj=rel)
    import torch

    features = sorted((run / "results/features/resnet18/20x").glob("*.pt"))
    assert len(features) == N_SLIDES + len(BAD)
    for path in features:
        a = torch.load(path, weights_only=True)
        b = torch.load(sharded / path.relative_to(run), weights_only=True)
        assert a["status"] == b["status"] and torch.equal(a["features"], b["features"]), path.name
    predictions = sorted(p.relative_to(run) for p in (run / "results").rglob("predictions.tsv"))
    assert len(predictions) == 2 * 3 * FOLDS
    for rel in predictions:  # same bags in the same order: the same models
        pd.testing.assert_frame_equal(pd.read_csv(run / rel, sep="\t"), pd.read_csv(sharded / rel, sep="\t"),
                                      rtol=1e-4, obj=str(rel))
    assert (sharded / "results/figures/qc/qc_montage.png").is_file()


def test_sharded_second_run_does_nothing(sharded):
    assert planned(sharded, SHARDED) == {}


def test_sharded_changes_rerun_shards_of_the_steps_they_touch(sharded):
    jobs = planned(sharded, edited(preprocess__shards=3, preprocess__magnifications=[5, 10, 20, 40]))
    assert jobs.pop("patch_shard") == 3 and jobs.pop("manifest") == 1
    assert set(jobs) <= {"figures_qc"}, jobs
    jobs = planned(sharded, edited(preprocess__shards=3, preprocess__min_tissue=0.6))
    assert jobs["patch_shard"] == 9 and not {"slide_qc_shard", "tissue_shard"} & set(jobs), jobs


@contextmanager
def left_as_found(run: Path, tmp: Path):
    """Put a run directory's results, Snakemake records and files back as they were (mtimes
    included), so a test may run jobs in a module fixture's run without other tests seeing it."""
    parts = [p for p in (run / "results", run / ".snakemake") if p.exists()]
    before = {p: tmp / p.name for p in parts}
    files = set(run.rglob("*"))
    for part, copy in before.items():
        shutil.copytree(part, copy, symlinks=True)
    try:
        yield
    finally:
        for part, copy in before.items():
            shutil.rmtree(part)
            shutil.copytree(copy, part, symlinks=True)
        for new in sorted(set(run.rglob("*")) - files, reverse=True):
            if new.is_file() or new.is_symlink():
                new.unlink()


def test_sharded_adding_a_slide_redoes_that_slide_alone(sharded, tmp_path):
    demo = sharded / "resources/demo"
    sheet = pd.read_csv(demo / "slides.tsv", sep="\t", dtype=str)
    extra = pd.concat([sheet, pd.DataFrame([{"slide_id": "EXTRA-1", "path": "slides/EXTRA-1.svs",
                                             "case_id": sheet.loc[0, "case_id"]}])])
    config = edited(preprocess__shards=3, samples="resources/demo/extra.tsv")
    with left_as_found(sharded, tmp_path):
        shutil.copy(demo / "slides/DEMO-S001.svs", demo / "slides/EXTRA-1.svs")
        extra.to_csv(demo / "extra.tsv", sep="\t", index=False)
        jobs = planned(sharded, config)
        assert {r: jobs.get(r) for r in SHARD_RULES} == {"slide_qc_shard": 1, "tissue_shard": 1, "patch_shard": 3,
                                                          "extract_features_shard": 1}, jobs
        stores = {p: p.stat().st_mtime_ns for p in (sharded / "results/lmdb").rglob("*.lmdb")}
        res = snakemake(sharded, config, "--cores", "2", "results/patches/manifest.tsv")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        from e2epath.preprocess.shards import shard_of

        log = (sharded / f"results/logs/shards/patch/10x/{shard_of('EXTRA-1', 3)}.log").read_text()
        assert "EXTRA-1: running (new)" in log
        counts = re.search(r": (\d+) slides, (\d+) up to date \(skipped\), 1 run, 0 failed", log)
        assert counts and int(counts[2]) == int(counts[1]) - 1 > 0, log
        assert all(p.stat().st_mtime_ns == t for p, t in stores.items())  # no other store rewritten
        manifest = pd.read_csv(sharded / "results/patches/manifest.tsv", sep="\t")
        assert set(manifest.loc[manifest["slide_id"] == "EXTRA-1", "status"]) == {"ok"}
    assert planned(sharded, SHARDED) == {}  # the fixture is as it was: nothing to do


def test_a_two_by_two_sweep_is_four_methods_and_one_new_value_runs_only_its_own(run, tmp_path):
    config = edited()
    config["sweeps"] = {"grid": {"base": "r18_mean", "grid": {"epochs": [1, 2], "aggregator_kw.dropout": [0.0, 0.25]}}}
    # keys in the config's order (the written config sorts them), values as written
    names = [f"grid.dropout-{d}.epochs-{e}" for d in ("0.0", "0.25") for e in (1, 2)]
    jobs = planned(run, config)
    assert jobs["train_e2e"] == 4 * 2 * FOLDS  # four new methods, both tasks, every fold; nothing else trains
    assert "train_twostage" not in jobs and "patch" not in jobs
    with left_as_found(run, tmp_path):
        targets = [RUN_DIR.format(family="e2e", task=task, method=name, fold=k) + "/run.json"
                   for name in names for task in TINY["tasks"] for k in range(FOLDS)]
        res = snakemake(run, config, "--cores", "2", *targets)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        for name in names:
            assert (run / f"results/e2e/subtype/{name}/fold0/predictions.tsv").is_file(), name
        config["sweeps"]["grid"]["grid"]["aggregator_kw.dropout"] = [0.0, 0.5]
        jobs = planned(run, config)
        assert jobs.pop("train_e2e") == 2 * 2 * FOLDS  # dropout 0.5 with epochs 1 and 2; dropout 0.0 untouched
        assert set(jobs) <= {"evaluate", "tables", "figures_task"}, jobs


def test_imagenet_weights_that_cannot_be_had_stop_the_run_before_any_training(run, tmp_path):
    """weights: imagenet, an empty torch cache and no network: the encoder_weights job fails with
    the cache path and the ways out, and no training job starts."""
    config = edited(e2e__defaults__weights="imagenet")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    with left_as_found(run, tmp_path / "saved"):
        res = snakemake(run, config, "--cores", "2", "all", env=env)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert "rule encoder_weights" in out and "rule train_e2e" not in out, out[-3000:]
        log = (run / "results/logs/encoder_weights/imagenet/resnet18.log").read_text()
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in log
        assert "could not be downloaded" in log and "weights: <file>" in log and "weights: null" in log


def test_a_second_encoder_runs_only_its_features_and_methods(run, tmp_path):
    """A small ViT from a weights file next to the ResNet: adding it runs its feature jobs and its
    method; its features have the preset's width and record the file's hash, as does the table."""
    import hashlib

    from safetensors.torch import save_file

    from e2epath.models.encoders import TimmEncoder
    from e2epath.models.presets import encoder_spec

    vit = {"arch": "timm:vit_tiny_patch16_224", "dim": 192, "input_size": 32, "embedding": "cls",
           "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 0}}
    weights = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in TimmEncoder(encoder_spec("vit_tiny", vit)).model.state_dict().items()},
              str(weights))
    config = edited(twostage__encoders=["resnet18", "vit_tiny"])
    config["encoders"]["vit_tiny"] = {**vit, "weights": str(weights)}
    config["twostage"]["methods"]["ts_vit_abmil"] = {"encoder": "vit_tiny", "aggregator": "abmil"}
    jobs = planned(run, config)
    assert jobs.pop("extract_features") == N_SLIDES + len(BAD)  # the ViT's; the ResNet's are done
    assert jobs.pop("train_twostage") == 2 * FOLDS  # ts_vit_abmil only, both tasks
    assert jobs.pop("maps") == 2  # its attention maps, both tasks
    assert set(jobs) <= {"evaluate", "tables", "figures_task"}, jobs
    with left_as_found(run, tmp_path / "saved"):
        res = snakemake(run, config, "--cores", "2", "all")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        import torch

        rec = torch.load(run / "results/features/vit_tiny/20x/DEMO-S001.pt", weights_only=True)
        assert rec["features"].shape[1] == 192 and rec["encoder"] == "vit_tiny"
        assert rec["encoder_weights"]["sha256"] == sha
        table = (run / "results/tables/subtype.md").read_text()
        assert f"| ts_vit_abmil | vit_tiny | {weights} | {sha[:16]}… |" in table
        assert "| ts_abmil | resnet18 | random init | — |" in table
        metrics = pd.read_csv(run / "results/metrics/subtype.tsv", sep="\t")
        assert {"ts_abmil", "ts_vit_abmil"} <= set(metrics["method"])
        assert planned(run, config) == {}


def test_predict_on_raw_slides_equals_the_workflows_predictions(run, tmp_path, caplog):
    """`python -m e2epath predict` on a raw demo slide, with the fold model that tested it, gives
    the workflow's prediction and attention; with both fold models, their mean; a two-stage model
    too. Its map, montage and QuPath GeoJSON describe the same patches."""
    import logging

    import cv2
    import numpy as np
    import torch

    from e2epath.deploy import predict

    qc = pd.read_csv(run / "results/slides.tsv", sep="\t", dtype={"slide_id": str}).set_index("slide_id")
    folder = run / "results/e2e/subtype/r18_abmilx"
    preds = pd.read_csv(folder / "fold0/predictions.tsv", sep="\t", dtype={"slide_id": str})
    slide = next(s for s in preds["slide_id"] if qc.loc[s, "mpp_source"] != "sheet")
    path = qc.loc[slide, "path"]
    out = tmp_path / "one"
    assert predict.cli(["--model", str(folder / "fold0/model.pt"), "--out", str(out), path]) == 0
    got = pd.read_csv(out / f"{slide}.predictions.tsv", sep="\t")
    want = preds.set_index("slide_id").loc[slide]
    probs = [c for c in preds.columns if c.startswith("prob_")]
    assert list(got["model"]) == [str(folder / "fold0/model.pt"), "ensemble"]
    np.testing.assert_allclose(got[probs].to_numpy(float), [want[probs].to_numpy(float)] * 2, atol=1e-5)
    summary = json.loads((out / f"{slide}.json").read_text())
    assert summary["status"] == "ok" and summary["predicted_class"] in [p.removeprefix("prob_") for p in probs]
    # attention: the workflow's attention.npz for this slide, head by head
    with np.load(folder / "fold0/attention.npz") as npz:
        ref, ref_xy = npz[slide], npz[f"{slide}__coords"]
    geo = json.loads((out / f"{slide}.attention.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == summary["n_patches"] == len(ref_xy)
    heads = ref.shape[0]
    names = [f"attention head {h + 1}" for h in range(heads)] + ["attention mean"]
    for i, feature in enumerate(geo["features"]):
        props = feature["properties"]
        assert props["objectType"] == "detection" and list(props["measurements"]) == names
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ref_xy[i]).all()
        assert (ring >= 0).all() and (ring[:, 0] <= qc.loc[slide, "width"]).all() and \
            (ring[:, 1] <= qc.loc[slide, "height"]).all()
    values = np.array([[f["properties"]["measurements"][n] for n in names] for f in geo["features"]])
    np.testing.assert_allclose(values[:, :heads].T, ref, atol=1e-5)
    np.testing.assert_allclose(values[:, -1], ref.mean(0), atol=1e-5)
    png = cv2.imread(str(out / f"{slide}.attention.png"))
    scale = qc.loc[slide, "mpp"] / 8.0  # 8 µm/px by default
    assert abs(png.shape[1] - qc.loc[slide, "width"] * scale) <= 2
    assert cv2.imread(str(out / f"{slide}.montage.png")) is not None

    # both fold models: the ensemble is their mean
    both = tmp_path / "both"
    models = [str(folder / f"fold{k}/model.pt") for k in range(FOLDS)]
    assert predict.cli(["--model", *models, "--out", str(both), path]) == 0
    table = pd.read_csv(both / f"{slide}.predictions.tsv", sep="\t")
    np.testing.assert_allclose(table[probs].iloc[-1].to_numpy(float), table[probs].iloc[:-1].mean().to_numpy(float))
    np.testing.assert_allclose(table[probs].iloc[0].to_numpy(float), want[probs].to_numpy(float), atol=1e-5)

    # a two-stage model: features from its recorded encoder, then its aggregator
    ts = run / "results/twostage/subtype/ts_abmil/fold0"
    ts_preds = pd.read_csv(ts / "predictions.tsv", sep="\t", dtype={"slide_id": str}).set_index("slide_id")
    assert predict.cli(["--model", str(ts / "model.pt"), "--out", str(tmp_path / "ts"), path]) == 0
    got = pd.read_csv(tmp_path / "ts" / f"{slide}.predictions.tsv", sep="\t")
    np.testing.assert_allclose(got[probs].iloc[0].to_numpy(float), ts_preds.loc[slide, probs].to_numpy(float),
                               atol=1e-5)

    # a slide that cannot give the model's magnification is refused with the reason; a broken file
    # fails alone; the good slide next to them is still predicted
    record = torch.load(folder / "fold0/model.pt", weights_only=True)
    record["spec"]["eval_magnification"] = 40
    torch.save(record, tmp_path / "m40.pt")
    twenty = next(s for s in qc.index if qc.loc[s, "vendor"] == "generic-tiff" and qc.loc[s, "status"] == "ok"
                  and qc.loc[s, "mpp"] > 0.3)
    mixed = tmp_path / "mixed"
    with caplog.at_level(logging.ERROR):
        code = predict.cli(["--model", str(tmp_path / "m40.pt"), "--out", str(mixed), qc.loc[twenty, "path"],
                            str(run / "resources/demo/slides/BAD-TEXT.svs")])
    assert code == 1
    refused = json.loads((mixed / f"{twenty}.json").read_text())
    assert refused["status"] == "refused" and "40x" in refused["reason"] and "unavailable" in refused["reason"]
    assert json.loads((mixed / "BAD-TEXT.json").read_text())["status"] == "refused"
    assert twenty in caplog.text
    # a model file of another format, and one that lost what new slides are prepared with
    for name, change in (("old.pt", {"format_version": 1}), ("cut.pt", {"preprocess": None})):
        damaged = {k: v for k, v in {**record, **change}.items() if v is not None}
        torch.save(damaged, tmp_path / name)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert predict.cli(["--model", str(tmp_path / name), "--out", str(tmp_path / "old"), path]) == 2
        assert f"{name}: " in caplog.text and "Retrain" in caplog.text
    assert "without preprocess" in caplog.text


def test_the_readme_predict_command_runs_on_a_raw_demo_slide(run):
    """README's `predict` example, as written (the fold glob expanded as a shell would), from the
    run directory after `all`."""
    import glob
    import shlex

    section = (ROOT / "README.md").read_text().split("## Predicting new slides")[1].split("\n## ")[0]
    argv = shlex.split(re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip())
    assert argv[:4] == [".venv/bin/python", "-m", "e2epath", "predict"]
    expanded = [x for a in argv[4:] for x in (sorted(glob.glob(a, root_dir=run)) if "*" in a else [a])]
    assert len(expanded) == len(argv) - 4 + FOLDS - 1  # one model per fold
    try:
        res = subprocess.run([sys.executable, "-m", "e2epath", "predict", *expanded], cwd=run, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        summary = json.loads((run / "results/predict/DEMO-S001.json").read_text())
        assert summary["status"] == "ok" and len(summary["models"]) == FOLDS
        assert abs(sum(summary["prediction"].values()) - 1) < 1e-5  # class probabilities of the ensemble
    finally:
        shutil.rmtree(run / "results/predict", ignore_errors=True)


# ---------------------------------------------------------------- external cohorts

COHORT_JOBS = {"cohort_slide_qc", "cohort_tissue", "cohort_patch", "cohort_qc_table", "cohort_manifest",
               "cohort_extract_features", "predict_cohort", "cohort_maps", "cohort_figures_qc"}


def write_cohorts(run: Path) -> dict:
    """Two cohorts in the run directory and the config naming them: `ext`, the demo's external cohort
    (another scanner) plus a corrupt slide and a slide whose mpp nobody knows, labelled for the subtype
    task only; `newb`, two of its slides without labels."""
    from e2epath.sources import demo

    ext = run / "resources/ext"
    demo.write_external(ext, n_slides=6, seed=1, scale=0.5)
    sheet = pd.read_csv(ext / "slides.tsv", sep="\t", dtype=str)
    tagless = sheet[sheet["mpp"].notna()].iloc[0]  # the slide whose mpp only the sheet knows
    shutil.copy(ext / tagless["path"], ext / "slides/EXT-NOMPP.tif")
    (ext / "slides/EXT-BAD.svs").write_bytes((ext / sheet.loc[0, "path"]).read_bytes()[:30000])
    extra = pd.DataFrame([{"slide_id": "EXT-NOMPP", "path": "slides/EXT-NOMPP.tif", "case_id": sheet.loc[1, "case_id"]},
                          {"slide_id": "EXT-BAD", "path": "slides/EXT-BAD.svs", "case_id": sheet.loc[0, "case_id"]}])
    pd.concat([sheet, extra]).to_csv(ext / "slides.tsv", sep="\t", index=False)
    newb = sheet.iloc[:2].assign(path=[str(ext / p) for p in sheet["path"].iloc[:2]])
    newb.to_csv(run / "resources/newb.tsv", sep="\t", index=False)
    config = edited()
    config["cohorts"] = {"ext": {"samples": "resources/ext/slides.tsv",
                                 "labels": {"subtype": "resources/ext/labels/subtype.csv"}},
                         "newb": {"samples": "resources/newb.tsv"}}
    return config


def test_external_cohorts_are_prepared_predicted_and_scored_alone(run, tmp_path):
    from sklearn.metrics import roc_auc_score

    with left_as_found(run, tmp_path / "saved"):
        config = write_cohorts(run)
        unlabelled = json.loads(json.dumps(config))
        del unlabelled["cohorts"]["ext"]
        jobs = planned(run, unlabelled)  # an unlabelled cohort: its own jobs, no evaluation
        assert set(jobs) == COHORT_JOBS, jobs
        assert jobs["predict_cohort"] == 2 * 3 and jobs["cohort_slide_qc"] == 2 and jobs["cohort_maps"] == 2 * 2
        jobs = planned(run, config)  # the labelled one adds the subtype task's evaluation, nothing internal
        assert set(jobs) == COHORT_JOBS | {"evaluate", "tables", "figures_task"}, jobs
        assert jobs["evaluate"] == jobs["tables"] == jobs["figures_task"] == 1
        assert jobs["cohort_slide_qc"] == 2 + 8
        models = {p: p.stat().st_mtime_ns for p in (run / "results").glob("*/*/*/fold*/model.pt")}
        res = snakemake(run, config, "--cores", "2", "all")
        assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
        assert all(p.stat().st_mtime_ns == t for p, t in models.items())  # nothing internal retrained
        qc = pd.read_csv(run / "results/cohorts/ext/slides.tsv", sep="\t").set_index("slide_id")
        assert qc.loc["EXT-BAD", "status"] == "failed" and len(qc.loc["EXT-BAD", "error"]) > 10
        assert qc.loc["EXT-NOMPP", "status"] == "failed" and "mpp" in qc.loc["EXT-NOMPP", "error"]
        assert (qc.drop(index=["EXT-BAD", "EXT-NOMPP"])["status"] == "ok").all()
        manifest = pd.read_csv(run / "results/cohorts/ext/patches/manifest.tsv", sep="\t")
        bad = manifest[manifest["slide_id"].isin(["EXT-BAD", "EXT-NOMPP"])]
        assert len(bad) == 2 * 3 and set(bad["status"]) == {"failed"} and (bad["n_patches"] == 0).all()
        # every fold model predicted every bag; the ensemble is their mean
        folder = run / "results/cohorts/ext/predictions/subtype/r18_abmilx"
        folds = [pd.read_csv(folder / f"fold{k}.tsv", sep="\t") for k in range(FOLDS)]
        ens = pd.read_csv(folder / "ensemble.tsv", sep="\t")
        assert sorted(ens["slide_id"]) == sorted(set(qc.index) - {"EXT-BAD", "EXT-NOMPP"})  # slide bags
        assert np.allclose(ens["prob_positive"], np.mean([f["prob_positive"] for f in folds], axis=0), atol=1e-6)
        rec = json.loads((folder / "prediction.json").read_text())
        assert rec["labelled"] and rec["folds"] == list(range(FOLDS)) and len(rec["models"]) == FOLDS
        # labelled external metrics equal scikit-learn on the ensemble's predictions
        metrics = pd.read_csv(run / "results/metrics/subtype.tsv", sep="\t", dtype={"fold": str})
        row = metrics[(metrics["cohort"] == "ext") & (metrics["method"] == "r18_abmilx") & (metrics["unit"] == "slide")
                      & (metrics["fold"] == "ensemble") & (metrics["metric"] == "auc")]
        assert len(row) == 1
        assert np.isclose(row["point"].iloc[0], roc_auc_score(ens["label"] == "positive", ens["prob_positive"]),
                          atol=1e-9)
        assert {"0", "1", "folds", "ensemble"} <= set(metrics.loc[metrics["cohort"] == "ext", "fold"])
        assert "newb" not in set(metrics["cohort"])  # unlabelled: predictions, no metrics
        survival = pd.read_csv(run / "results/metrics/survival.tsv", sep="\t")
        assert set(survival["cohort"]) == {"internal"}  # ext has no survival labels
        paired = pd.read_csv(run / "results/metrics/subtype_paired.tsv", sep="\t")
        assert "ext" in set(paired["cohort"])
        table = (run / "results/tables/subtype.md").read_text()
        assert "AUC (internal)" in table and "AUC (ext)" in table
        # the unlabelled cohort: predictions of both tasks, without label columns
        newb = pd.read_csv(run / "results/cohorts/newb/predictions/survival/r18_abmilx/ensemble.tsv", sep="\t")
        cases = pd.read_csv(run / "resources/newb.tsv", sep="\t")["case_id"]
        assert list(newb.columns) == ["case_id", "risk"] and sorted(newb["case_id"]) == sorted(set(cases))
        # maps of the cohort: the mean over fold models, one GeoJSON measurement per model and head
        gj = json.loads((run / "results/cohorts/ext/maps/subtype/r18_abmilx/EXT-S001.attention.geojson").read_text())
        names = set(gj["features"][0]["properties"]["measurements"])
        assert "attention mean" in names and {f"attention model {k + 1} head 1" for k in range(FOLDS)} <= names
        assert (run / "results/cohorts/ext/figures/qc").is_dir()
        res = snakemake(run, config, "--report", str(run / "results/report.html"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "External cohorts" in (run / "results/report.html").read_text(errors="replace")
        assert planned(run, config) == {}
    assert planned(run, TINY) == {}  # the fixture is as it was
