"""The tiny workflow run the workflow tests start from: the tiny demo cohort (tests/tiny.yaml) with
two broken slides added on existing cases, run through `all` (no --keep-going: a bad slide must not
fail a job).

    python tests/tiny_run.py RUN

builds it in the folder RUN with the Python that runs this script (and its Snakemake). CI builds it
once with README command 1's environment (the newcomer path) and hands it to the workflow tests
(`E2EPATH_TINY_RUN=RUN`), so the tiny workflow runs once per CI run; without that variable the
tests build it themselves.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "config.yaml"  # the run's config, in the run folder
BAD = {"BAD-TEXT": b"this is not a slide\n", "BAD-TRUNC": None}  # None: a truncated real slide


def snakemake(run: Path, *args: str, config: Path | None = None, timeout: int = 1500,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One `snakemake` process on the run folder, from anywhere (`-s … --directory …`)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(run),
           "--configfile", str(config or run / CONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def add_bad_slides(demo: Path) -> None:
    """Two broken files in the cohort, on existing cases: the run must still complete."""
    sheet = pd.read_csv(demo / "slides.tsv", sep="\t", dtype=str)
    rows = []
    for i, (slide, data) in enumerate(BAD.items()):
        data = data if data is not None else (demo / "slides/DEMO-S001.svs").read_bytes()[:20000]
        (demo / f"slides/{slide}.svs").write_bytes(data)
        rows.append({"slide_id": slide, "path": f"slides/{slide}.svs", "case_id": sheet.loc[i, "case_id"]})
    pd.concat([sheet, pd.DataFrame(rows)]).to_csv(demo / "slides.tsv", sep="\t", index=False)


def build(run: Path) -> None:
    """The tiny run in ``run``: the demo cohort, the broken slides, then `all` on two cores."""
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG).write_text((ROOT / "tests" / "tiny.yaml").read_text())
    for target in ("resources/demo/slides.tsv", "all"):
        res = snakemake(run, "--cores", "2", target)
        if res.returncode != 0:
            raise RuntimeError(f"snakemake {target} failed in {run}:\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}")
        if target != "all":
            add_bad_slides(run / "resources/demo")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
