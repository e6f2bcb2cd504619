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

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(__file__).resolve().parent / "slurm"
N_SLIDES = 6
CONFIG = {
    "samples": "resources/demo/slides.tsv",
    "demo": {"enabled": True, "n_slides": N_SLIDES, "seed": 0, "scale": 0.5},
    "tasks": {"subtype": {"type": "classification", "labels": "resources/demo/labels/subtype.csv"}},
    "splits": {"mode": "kfold", "k": 2, "val_fraction": 0.3},
    "preprocess": {"magnifications": [10, 20], "patch_size": 128, "tissue": {"preset": "biopsy"}},
    "e2e": {"defaults": {"weights": None, "n_instances": 8, "input_size": 32, "epochs": 1, "batch_size": 2,
                         "workers": 0, "sampling": {"magnifications": [10, 20], "ratios": [0.5, 0.5]}},
            "methods": {"r18_abmilx": {"encoder": "resnet18", "aggregator": "abmilx"}}},
    "twostage": {"encoder": "resnet18", "weights": None, "magnification": 20, "input_size": 32,
                 "defaults": {"epochs": 1}, "methods": {"ts_abmil": {"aggregator": "abmil"}}},
    "evaluate": {"n_boot": 10},
}
TARGETS = ["results/e2e/subtype/r18_abmilx/fold0/predictions.tsv",
           "results/twostage/subtype/ts_abmil/fold0/predictions.tsv"]
GPU_RULES = {"train_e2e", "train_mil", "features"}  # `features`: the extract_features group


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


@pytest.fixture(scope="module")
def run(slurm, tmp_path_factory):
    """One `snakemake --profile profiles/slurm` run to two training outputs; its log."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # No accounting database here: squeue is the status source (it keeps finished jobs for
    # MinJobAge); the first status poll after 2 s instead of 40 s keeps the test short.
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(run),
           "--configfile", str(run / "config.yaml"), "--profile", str(ROOT / "profiles" / "slurm"),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-keep-successful-logs", "--verbose", *TARGETS]
    res = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=1200, check=False)
    log = res.stdout + res.stderr
    (run / "snakemake.log").write_text(log)
    assert res.returncode == 0, log[-6000:] + "\n" + (slurm / "slurmctld.log").read_text()[-3000:]
    return run, log


def submissions(log: str) -> dict[str, str]:
    """SLURM job id → submitted rule or group (`rule_train_e2e`, `group_preprocess_…`)."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/([^/]+)/", log)
    return {jobid: name for jobid, name in found}


def test_training_outputs_are_built(run):
    run_dir, _ = run
    for target in TARGETS:
        lines = (run_dir / target).read_text().splitlines()
        assert lines[0].startswith("case_id") and len(lines) > 1, target


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
    seen = set()
    for jobid, name in jobs.items():
        shown = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True,
                               check=True).stdout
        gpu_rule = next((r for r in GPU_RULES if name in (f"rule_{r}",) or name.startswith(f"group_{r}_")), None)
        if gpu_rule:
            seen.add(gpu_rule)
            assert "TresPerJob=gres:gpu:1" in shown, (name, shown)
        else:
            assert "gres:gpu" not in shown, (name, shown)
    assert seen == GPU_RULES, jobs
    calls = [line for line in run[1].splitlines() if line.startswith("sbatch call:")]
    assert sum("--gpus=1" in c.split("--wrap")[0] for c in calls) == len(GPU_RULES)
