"""Every bench script still runs against the current package: `python bench/<script> --quick` (its
whole code path on tiny sizes) exits 0 and prints the lines that script always prints. No timing
is checked: the numbers of a quick run mean nothing, only that they were measured."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))
TIMEOUT_S = 300  # a hang guard only: the slowest quick run (dag.py) takes 1-2 minutes on 2 busy cores
NUMBER = r"[+-]?\d[\d,]*(?:\.\d+)?"

# Per script: patterns (multi-line regular expressions) its quick run's stdout must match.
PRINTS: dict[str, list[str]] = {
    "abmilx.py": [rf"^\| \d+ \|( {NUMBER} \|){{8}}$", rf"^\|( {NUMBER} \|){{7}}$"],  # forward, train step
    "dag.py": [r"^\| measurement \| value \(s or ratio\) \| note \|$",
               rf"^\| dry run `-n all`, \d+ slides \(\d+ jobs\) \| {NUMBER} \|",
               rf"^\| dry run `-n all`, \d+ slides, `preprocess.shards: \d+` \(\d+ jobs\) \| {NUMBER} \|",
               rf"^\| real `preprocess`, \d+ slides, \d+ jobs, --cores \d+ \| {NUMBER} \|",
               rf"^\| no-op real `preprocess`, \d+ slides, shards \| {NUMBER} \|",
               rf"^\| projected preprocess at \d+ slides: overhead / \(overhead \+ work\) \| {NUMBER} \|",
               r"^## cProfile of `snakemake -n all`"],
    "features.py": [rf"^\| extract, workers=2 \| {NUMBER} \| {NUMBER} \| {NUMBER}% \|$",
                    rf"^resnet50: best extraction overhead {NUMBER}%",
                    rf"^vit_small: best extraction overhead {NUMBER}%"],
    "gpu_e2e.py": [rf"^\| resnet18 \+ abmilx \| .+ \| {NUMBER} \|", rf"^\| resnet50 \+ abmilx \| .+ \| {NUMBER} \|"],
    "inference.py": [rf"^\| whole slide \(predict_bag\) \| {NUMBER} \| {NUMBER} \| {NUMBER}% \|$",
                     rf"^whole-slide inference overhead {NUMBER}%"],
    "loader.py": [rf"^\| dataset, 2 workers \| {NUMBER} \| {NUMBER}x \|$",
                  rf"^per worker: dataset / raw = {NUMBER} \(goal >= 0.85\)"],
    "metrics.py": [r"^C-index: point ours .* \(identical: True\)$", r"^AUC: point ours .* \(identical: True\)$",
                   rf"^  \d+ resamples: vectorised {NUMBER} s, reference loop {NUMBER} s, speed-up {NUMBER}x"],
    "preprocess.py": [rf"^\| 5x \| \d+ \| \d+ \| {NUMBER} \|",
                      rf"^\| patches/s \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$"],
}


def run_quick(script: Path, tmp: Path) -> subprocess.CompletedProcess:
    """``python bench/<script> --quick`` from the repository root, the package importable from
    workflow/ (as the scripts' docstrings run them), temporary files under ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "workflow"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


# Scripts that start real snakemake processes belong to the workflow tier.
WORKFLOW = {"dag.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.workflow] if s.name in WORKFLOW else [])
                                    for s in SCRIPTS], ids=lambda s: s.name)
def test_quick_mode_runs(script: Path, tmp_path: Path):
    done = run_quick(script, tmp_path)
    tail = f"\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{script.name} --quick exited {done.returncode}{tail}"
    assert script.name in PRINTS, f"add the lines {script.name} always prints to PRINTS in tests/test_bench.py"
    for pattern in PRINTS[script.name]:
        assert re.search(pattern, done.stdout, re.MULTILINE), f"{script.name}: no line matches {pattern!r}{tail}"
