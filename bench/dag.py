"""Benchmark: Snakemake's own cost on large cohorts (DAG build, no-op reruns, per-job overhead).

(a) `snakemake -n all` (also with `--quiet --rerun-triggers mtime`) and `-n preprocess` on a
    10,000-slide sheet (hard links to 4 small demo slides; only paths matter for a dry run), and
    on 2,000 slides for the projection in (d);
(b) one real `snakemake --cores 2 preprocess` on 200 slides, then its no-op reruns (`-n` and a
    real run) with all rerun triggers and with `--rerun-triggers mtime`;
(c) per-job overhead of (b): cores x wall - sum of the jobs' own wall time (start/end recorded in
    .snakemake/metadata), and the cost of the `script:` preamble every job pays;
(d) the overhead share at 2,000 slides, projected from (a) and (c);
(e) (a) and (b) again with `preprocess.shards` = slides / --shard-size (one job per shard of
    slides and step, e2epath.preprocess.shards), and the sharded dry run with the SLURM profile when
    snakemake-executor-plugin-slurm is installed.
Goals: (a) <= 30 s, no-op rerun <= 10 s, (d) <= 5 %. Prints a Markdown table.

    PYTHONPATH=workflow python bench/dag.py [--n-dry 10000] [--n-run 200] [--cores 2] [--shard-size 20] [--cprofile]
    PYTHONPATH=workflow python bench/dag.py --quick

--quick is a smoke test of every step above on tiny cohorts, each kind of Snakemake call once
(about a minute on 2 cores; every call costs seconds whatever the cohort): (a) and (e) on 100
slides (also the cohort of the projection) with --cprofile, (b), (c) and (e) on 2 real slides in
shards of one; the repeats of a call with `--quiet --rerun-triggers mtime` or with
`--rerun-triggers mtime` alone are left out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from e2epath.sources import demo

ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["--scheduler", "greedy"]
QUIET = ["--quiet", "--rerun-triggers", "mtime"]  # a dry run's cheapest settings
TRIGGERS = (("all rerun triggers", []), ("--rerun-triggers mtime", ["--rerun-triggers", "mtime"]))


def base_slides(out: Path) -> pd.DataFrame:
    """Four small real demo slides (two vendors) to hard-link from."""
    if not (out / "slides.tsv").exists():
        demo.write(out, n_slides=4, seed=0, scale=0.5)
    sheet = pd.read_csv(out / "slides.tsv", sep="\t")
    sheet["path"] = [str(out / p) for p in sheet["path"]]
    return sheet


def cohort(base: pd.DataFrame, n: int, out: Path) -> Path:
    """A sheet of ``n`` slides (two per case) with both label tables; returns the config path."""
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        src = base.iloc[i % len(base)]
        dst = out / "slides" / f"S{i:05d}{Path(src['path']).suffix}"
        if not dst.exists():
            os.link(src["path"], dst)
        rows.append({"slide_id": dst.stem, "path": f"slides/{dst.name}", "case_id": f"C{i // 2:05d}",
                     "mpp": src["mpp"]})
    pd.DataFrame(rows).to_csv(out / "slides.tsv", sep="\t", index=False)
    cases = sorted({r["case_id"] for r in rows})
    pd.DataFrame({"case_id": cases, "label": ["positive" if k % 2 else "negative" for k in range(len(cases))]}
                 ).to_csv(out / "labels/subtype.csv", index=False)
    pd.DataFrame({"case_id": cases, "time": [5.0 + k % 37 for k in range(len(cases))],
                  "event": [k % 3 != 0 for k in range(len(cases))]}).astype({"event": int}
                 ).to_csv(out / "labels/survival.csv", index=False)
    config = {
        "samples": str(out / "slides.tsv"),
        "demo": {"enabled": False},
        "tasks": {"subtype": {"type": "classification", "labels": str(out / "labels/subtype.csv")},
                  "survival": {"type": "survival", "labels": str(out / "labels/survival.csv"), "n_bins": 2}},
        "splits": {"mode": "kfold", "k": 3, "val_fraction": 0.25},
        "preprocess": {"magnifications": [5, 10, 20], "patch_size": 128, "tissue": {"preset": "biopsy"}},
        "e2e": {"defaults": {"weights": None, "input_size": 32, "epochs": 1, "workers": 0},
                "methods": {"r18_abmilx": {"encoder": "resnet18", "aggregator": "abmilx"},
                            "r18_mean": {"encoder": "resnet18", "aggregator": "mean"}}},
        "encoders": {"resnet18": {"weights": None, "input_size": 32}},
        "twostage": {"encoders": ["resnet18"], "magnification": 20, "methods": {"ts_abmil": {"aggregator": "abmil"}}},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(run: Path, config: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[float, str]:
    """Wall seconds of one snakemake process, and its output; fails loudly."""
    cmd = [sys.executable, *prefix, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(run),
           "--configfile", str(config), *args]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return wall, res.stdout + res.stderr


def job_seconds(run: Path) -> dict[str, list[float]]:
    """Each finished job's own wall time (Snakemake's start/end record), by rule; one per job."""
    seen, by_rule = set(), {}
    for f in (run / ".snakemake/metadata").iterdir():
        rec = json.loads(f.read_text())
        key = (rec["rule"], tuple(rec.get("log") or [f.name]))  # the outputs of one job share a log
        if key in seen or rec.get("starttime") is None:
            continue
        seen.add(key)
        by_rule.setdefault(rec["rule"], []).append(rec["endtime"] - rec["starttime"])
    return by_rule


def preamble_seconds(repeats: int = 3) -> float:
    """What every `script:` job pays before its own code: importing snakemake.script."""
    def once(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start
    bare = min(once("pass") for _ in range(repeats))
    return min(once("import snakemake.script") for _ in range(repeats)) - bare


def profile_dag(run: Path, config: Path, top: int = 18) -> None:
    out = run / "dag.prof"
    snakemake(run, config, "-n", "all", *GREEDY, prefix=("-m", "cProfile", "-o", str(out)))
    stats = pstats.Stats(str(out))
    print("\n## cProfile of `snakemake -n all` (cumulative, top functions)\n```")
    stats.sort_stats("cumulative").print_stats(top)
    print("```\n```")
    stats.sort_stats("tottime").print_stats(top)
    print("```")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-dry", type=int, default=10_000)
    ap.add_argument("--n-mid", type=int, default=2_000, help="cohort size of the overhead projection")
    ap.add_argument("--n-run", type=int, default=200)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=20, help="slides per shard in the sharded runs")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--cprofile", action="store_true", help="profile the 10,000-slide DAG build")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: dry runs on 100 slides with --cprofile, real runs on 2 slides, no repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_dry = args.n_mid = 100
        args.n_run, args.shard_size, args.cprofile = 2, 1, True
    repeats = not args.quick  # the calls again with QUIET / TRIGGERS[1]
    out = args.out or Path(tempfile.mkdtemp(prefix="e2epath-dag-"))
    base = base_slides(out / "base")
    rows: list[tuple[str, float, str]] = []

    dry = {}
    for n in sorted({args.n_dry, args.n_mid}, reverse=True):
        cfg = cohort(base, n, out / f"cohort{n}")
        run = out / f"dry{n}"
        dry[n], log = snakemake(run, cfg, "-n", "all", *GREEDY)
        n_jobs = int(log.split("Job stats:")[1].split("total")[1].split()[0])
        rows.append((f"dry run `-n all`, {n} slides ({n_jobs} jobs)", dry[n], f"{dry[n] / n_jobs * 1000:.1f} ms/job; goal <= 30 s"))
        if repeats:
            wall, _ = snakemake(run, cfg, "-n", "all", *QUIET, *GREEDY)
            rows.append((f"dry run `-n all --quiet --rerun-triggers mtime`, {n} slides", wall,
                         "no per-job listing, mtime only; goal <= 30 s"))
        wall, _ = snakemake(run, cfg, "-n", "preprocess", *GREEDY)
        rows.append((f"dry run `-n preprocess`, {n} slides", wall, "goal <= 30 s"))
        if n == args.n_dry and args.cprofile:
            profile_dag(run, cfg)
        n_shards = max(1, n // args.shard_size)
        cfg_sh = sharded(cfg, n_shards)
        wall, log = snakemake(out / f"dry{n}-sharded", cfg_sh, "-n", "all", *GREEDY)
        n_jobs = int(log.split("Job stats:")[1].split("total")[1].split()[0])
        rows.append((f"dry run `-n all`, {n} slides, `preprocess.shards: {n_shards}` ({n_jobs} jobs)", wall,
                     f"{dry[n] / wall:.1f}x faster than per-slide jobs; goal <= 30 s"))
        if repeats:
            wall, _ = snakemake(out / f"dry{n}-sharded", cfg_sh, "-n", "all", *QUIET, *GREEDY)
            rows.append((f"dry run `-n all --quiet --rerun-triggers mtime`, {n} slides, {n_shards} shards", wall,
                         "goal <= 30 s"))
        if importlib.util.find_spec("snakemake_executor_plugin_slurm"):  # what a cluster user runs
            wall, _ = snakemake(out / f"dry{n}-sharded", cfg_sh, "-n", "all", "--profile", str(ROOT / "profiles/slurm"))
            rows.append((f"dry run `-n all --profile profiles/slurm`, {n} slides, {n_shards} shards", wall,
                         "groups, greedy; goal <= 30 s"))

    cfg = cohort(base, args.n_run, out / f"cohort{args.n_run}")
    run = out / f"run{args.n_run}"
    wall_run, _ = snakemake(run, cfg, "--cores", str(args.cores), "preprocess", *GREEDY)
    jobs = job_seconds(run)
    n_jobs = sum(map(len, jobs.values()))
    work = sum(sum(v) for v in jobs.values())
    overhead = args.cores * wall_run - work
    rows.append((f"real `preprocess`, {args.n_run} slides, {n_jobs} jobs, --cores {args.cores}", wall_run, ""))
    rows.append(("  sum of the jobs' own wall time", work, f"{work / n_jobs:.2f} s/job"))
    rows.append(("  idle core-seconds (Snakemake between jobs)", overhead,
                 f"{overhead / n_jobs:.3f} s/job, {overhead / (args.cores * wall_run):.1%} of cores x wall"))
    preamble = preamble_seconds()
    rows.append(("  `script:` preamble inside each job (import snakemake.script)", preamble,
                 f"{preamble * n_jobs / work:.1%} of job time"))
    for label, triggers in TRIGGERS if repeats else TRIGGERS[:1]:
        wall, log = snakemake(run, cfg, "-n", "preprocess", *GREEDY, *triggers)
        assert "Nothing to be done" in log, log[-2000:]
        rows.append((f"no-op `-n preprocess`, {args.n_run} slides, {label}", wall, "goal <= 10 s"))
        wall, log = snakemake(run, cfg, "--cores", str(args.cores), "preprocess", *GREEDY, *triggers)
        assert "Nothing to be done" in log, log[-2000:]
        rows.append((f"no-op real `preprocess`, {args.n_run} slides, {label}", wall, "goal <= 10 s"))

    # The same 200 slides in shards of ``--shard-size`` (fresh outputs): whole run and no-op rerun.
    cfg_sh = sharded(cfg, max(1, args.n_run // args.shard_size))
    run_sh = out / f"run{args.n_run}-sharded"
    wall_sh, _ = snakemake(run_sh, cfg_sh, "--cores", str(args.cores), "preprocess", *GREEDY)
    rows.append((f"real `preprocess`, {args.n_run} slides, shards of ~{args.shard_size}", wall_sh,
                 f"{wall_sh / wall_run:.2f}x the per-slide run's wall time"))
    wall, log = snakemake(run_sh, cfg_sh, "--cores", str(args.cores), "preprocess", *GREEDY)
    assert "Nothing to be done" in log, log[-2000:]
    rows.append((f"no-op real `preprocess`, {args.n_run} slides, shards", wall, "goal <= 10 s"))

    # Projection: fixed cost = the DAG build (its dry run); per-job idle cost as measured above
    # net of this run's own DAG build; work per job as measured (demo slides are small: real
    # slides' jobs are longer, so the real share is lower).
    per_job_idle = max(0.0, overhead - args.cores * dry_time(run, cfg)) / n_jobs
    mid_jobs = n_jobs / args.n_run * args.n_mid
    mid_overhead = dry[args.n_mid] + per_job_idle * mid_jobs / args.cores
    mid_work = work / n_jobs * mid_jobs / args.cores
    rows.append((f"projected preprocess at {args.n_mid} slides: overhead / (overhead + work)",
                 mid_overhead / (mid_overhead + mid_work), "goal <= 0.05"))

    print(f"\nSnakemake {snakemake_version()}, {os.cpu_count()} CPUs, work folder {out}\n")
    print("| measurement | value (s or ratio) | note |\n|---|---:|---|")
    for name, value, note in rows:
        print(f"| {name} | {value:.3f} | {note} |")
    return 0


def sharded(cfg: Path, n_shards: int) -> Path:
    """The config ``cfg`` with ``preprocess.shards: n_shards``."""
    config = yaml.safe_load(cfg.read_text())
    config["preprocess"]["shards"] = n_shards
    path = cfg.with_name(f"config-shards{n_shards}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def dry_time(run: Path, cfg: Path) -> float:
    """DAG build of a finished run (what a real run pays before the first job)."""
    return snakemake(run, cfg, "-n", "preprocess", "--forceall", *GREEDY)[0]


def snakemake_version() -> str:
    return subprocess.run([sys.executable, "-m", "snakemake", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
