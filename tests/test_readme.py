"""The README's two set-up commands are the ones CI and users run."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("snakemake all --cores 8 --resources gpu=1")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_in_tiers():
    """CI installs the README's test environment as written, then runs its whole suite in two tiers
    whose markers, together, select every test (a test marked neither runs in the fast tier)."""
    install, _, pytest_command = readme_commands()[1].rpartition(" && ")
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert install in ci
    tiers = [line for line in ci if pytest_command in line]
    assert any(t.endswith('-m "not workflow and not slurm"') for t in tiers), tiers
    assert any(t.endswith('-m "workflow or slurm"') for t in tiers), tiers


def test_readme_benchmarks_come_from_bench_scripts():
    """Every benchmark table in the README names the bench/ script that prints it."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"bench/(\w+\.py)", text))
    assert named, "README names no bench/ script"
    for script in named:
        assert (ROOT / "bench" / script).is_file(), script


def documented_snakemake_commands() -> list[list[str]]:
    """Arguments of every `snakemake` command in a code block of README.md and config/README.md."""
    found = []
    for doc in ("README.md", "config/README.md"):
        text = (ROOT / doc).read_text()
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"^    (snakemake .*)$", text, re.M)
        for line in "\n".join(blocks).splitlines():
            words = shlex.split(line, comments=True)
            starts = [i for i, w in enumerate(words) if w.endswith("snakemake")]
            for i in starts:
                args = words[i + 1:]
                found.append(args[:args.index("&&")] if "&&" in args else args)
    return found


def test_documented_snakemake_commands_parse_as_meant(monkeypatch):
    """Snakemake's own parser reads each command: `--resources` takes every word after it, so a
    target written after `--resources gpu=1` is an error, not a target."""
    from snakemake.cli import parse_args

    monkeypatch.chdir(ROOT)
    commands = documented_snakemake_commands()
    assert len(commands) >= 4
    rules = set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk")), re.M))
    rules |= set(re.findall(r"^rule (\w+):", (ROOT / "Snakefile").read_text(), re.M))
    for args in commands:
        _, parsed = parse_args(args)
        assert parsed.targets and set(parsed.targets) <= rules, (args, parsed.targets)
        if "--resources" in args:
            assert {k: v.value for k, v in parsed.resources.items()} == {"gpu": 1}, args
