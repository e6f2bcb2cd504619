"""The README's two set-up commands are the ones CI and users run."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("snakemake --cores 8 --resources gpu=1 all")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert readme_commands()[1] in ci


def test_readme_benchmarks_come_from_bench_scripts():
    """Every benchmark table in the README names the bench/ script that prints it."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"bench/(\w+\.py)", text))
    assert named, "README names no bench/ script"
    for script in named:
        assert (ROOT / "bench" / script).is_file(), script
