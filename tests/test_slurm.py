"""The demo workflow through training on a real single-node SLURM, with `--profile profiles/slurm`.

tests/slurm/start.sh brings up munged, slurmctld and slurmd on this machine (root, Debian
packages slurmctld slurmd munge slurm-client slurm-wlm-basic-plugins; .ci/run installs them)
with partitions `cpu` and `gpu` as the profile names them and one fake GPU. Without root or
those binaries the test skips and says why. The daemons are stopped even when a test fails.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import GPU_RULES, ROOT, tiny_config

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

SLURM_DIR = Path(__file__).resolve().parent / "slurm"
N_SLIDES = 6
# The tiny workflow, smaller still: 6 slides, one task, one method per family, one epoch.
CONFIG = tiny_config()
CONFIG["demo"]["n_slides"] = N_SLIDES
CONFIG["tasks"] = {"subtype": CONFIG["tasks"]["subtype"]}
CONFIG["preprocess"]["magnifications"] = [10, 20]
CONFIG["e2e"]["defaults"].update(n_instances=8, epochs=1)
CONFIG["e2e"]["methods"] = {"r18_abmilx": CONFIG["e2e"]["methods"]["r18_abmilx"]}
CONFIG["twostage"]["defaults"]["epochs"] = 1
CONFIG["evaluate"]["n_boot"] = 10
TARGETS = ["results/e2e/subtype/r18_abmilx/fold0/predictions.tsv",
           "results/twostage/subtype/ts_abmil/fold0/predictions.tsv"]
PROFILE = yaml.safe_load((ROOT / "profiles/slurm/profile.yaml").read_text())


def gpu_job(name: str) -> bool:
    """Whether a submission (`rule_X` or `group_G_...`) runs a GPU rule."""
    if name.startswith("rule_"):
        return name.removeprefix("rule_") in GPU_RULES
    return any(name.startswith(f"group_{group}_") and rule in GPU_RULES for rule, group in PROFILE["groups"].items())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm not installed")
    state = tmp_path_factory.mktemp("slurm-state")
    start = subprocess.run(["bash", str(SLURM_DIR / "start.sh"), str(state)], capture_output=True, text=True,
                           timeout=120, check=False)
    try:
        if start.returncode == 77:
            pytest.skip(start.stderr.strip().removeprefix("SKIP: "))
        assert start.returncode == 0, start.stdout + start.stderr
        yield state
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh"), str(state)], capture_output=True, timeout=60, check=False)


def snakemake_slurm(slurm: Path, run: Path, config: dict, targets: list[str]) -> str:
    """One `snakemake --profile profiles/slurm` run to ``targets``; its log."""
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # No accounting database here: squeue is the status source (it keeps finished jobs for
    # MinJobAge); the first status poll after 2 s instead of 40 s keeps the test short.
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(run),
           "--configfile", str(run / "config.yaml"), "--profile", str(ROOT / "profiles" / "slurm"),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-keep-successful-logs", "--verbose", *targets]
    res = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=1200, check=False)
    log = res.stdout + res.stderr
    (run / "snakemake.log").write_text(log)
    assert res.returncode == 0, log[-6000:] + "\n" + (slurm / "slurmctld.log").read_text()[-3000:]
    return log


@pytest.fixture(scope="module")
def run(slurm, tmp_path_factory):
    """The demo through two training outputs, per-slide preprocessing jobs; (folder, log)."""
    run = tmp_path_factory.mktemp("run")
    return run, snakemake_slurm(slurm, run, CONFIG, TARGETS)


@pytest.fixture(scope="module")
def sharded(slurm, tmp_path_factory):
    """The demo's preprocessing and features with `preprocess.shards: 2`; (folder, log, shards)."""
    from e2epath.preprocess import shards
    from e2epath.sources import demo

    run = tmp_path_factory.mktemp("sharded")
    config = {**CONFIG, "preprocess": {**CONFIG["preprocess"], "shards": 2}}
    names = list(shards.assign(demo.plan(N_SLIDES, 0)["slide_id"], 2))
    targets = ["results/patches/manifest.tsv"] + [f"results/shards/features/resnet18/20x/{n}.json" for n in names]
    return run, snakemake_slurm(slurm, run, config, targets), names


def submissions(log: str) -> dict[str, str]:
    """SLURM job id → submitted rule or group (`rule_train_e2e`, `group_preprocess_…`)."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/([^/]+)/", log)
    return {jobid: name for jobid, name in found}


def test_training_outputs_are_built(run):
    run_dir, _ = run
    for target in TARGETS:
        lines = (run_dir / target).read_text().splitlines()
        # sub-typing bags are slides: one row per test slide, its case beside it
        assert lines[0].startswith("slide_id\tcase_id\t") and len(lines) > 1, target


def test_every_job_went_through_sbatch_and_ran_under_slurmd(run):
    run_dir, log = run
    jobs = submissions(log)
    assert len(jobs) >= 6, log[-3000:]
    listed = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs", ",".join(jobs)],
                            capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|") for line in listed.split())
    assert states == {jobid: "COMPLETED" for jobid in jobs}
    for jobid, name in jobs.items():  # written by slurmd, kept by --slurm-keep-successful-logs
        assert list((run_dir / ".snakemake/slurm_logs" / name).rglob(f"{jobid}.log")), (jobid, name)


def test_per_slide_preprocessing_is_one_grouped_submission(run):
    names = list(submissions(run[1]).values())
    groups = [n for n in names if n.startswith("group_preprocess")]
    assert len(groups) == 1, names  # N_SLIDES x (qc, tissue, 2 x patch) in one SLURM job
    assert not {"rule_slide_qc", "rule_tissue", "rule_patch"} & set(names), names
    assert sum(n.startswith("group_features") for n in names) == 1, names


def test_gpu_rules_ask_slurm_for_one_gpu_and_cpu_rules_for_none(run):
    jobs = submissions(run[1])
    asked = 0
    for jobid, name in jobs.items():
        shown = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True,
                               check=True).stdout
        assert ("TresPerJob=gres:gpu:1" in shown) == gpu_job(name), (name, shown)
        asked += gpu_job(name)
    # the E2E and two-stage training jobs and the grouped feature jobs
    assert {n for n in jobs.values() if gpu_job(n)} >= {"rule_train_e2e", "rule_train_twostage"}, jobs
    assert any(n.startswith("group_features_") for n in jobs.values()), jobs
    calls = [line for line in run[1].splitlines() if line.startswith("sbatch call:")]
    assert sum("--gpus=1" in c.split("--wrap")[0] for c in calls) == asked


def test_each_shard_is_one_submission_and_its_features_ask_for_a_gpu(sharded):
    run, log, names = sharded
    jobs = submissions(log)
    groups = [n for n in jobs.values() if n.startswith("group_preprocess_shard")]
    assert len(groups) == len(names) == 2, jobs  # (qc, tissue, 2 x patch) of a shard: one SLURM job
    assert not {"rule_slide_qc_shard", "rule_tissue_shard", "rule_patch_shard"} & set(jobs.values()), jobs
    features = [j for j, n in jobs.items() if n == "rule_extract_features_shard"]
    assert len(features) == 2, jobs
    for jobid in jobs:
        shown = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, check=True).stdout
        assert ("TresPerJob=gres:gpu:1" in shown) == (jobid in features), (jobs[jobid], shown)
    manifest = (run / "results/patches/manifest.tsv").read_text().splitlines()
    assert len(manifest) == 1 + N_SLIDES * 2
