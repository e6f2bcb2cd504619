"""Shards: preprocessing jobs over groups of slides, for cohorts too large for per-slide jobs.

Snakemake pays a few milliseconds per job to plan a run, so 10,000 slides x 6 per-slide jobs
take minutes before anything starts. With ``preprocess.shards: N`` each slide belongs to
shard ``crc32(slide_id) % N`` (adding slides changes only the shards they land in), and QC,
tissue, patching and feature extraction run one job per shard.

Per-slide files keep their per-slide paths but are no longer Snakemake outputs, so a shard job
redoes only the slides whose inputs changed: after a slide's step has written its outputs it
writes a marker holding a fingerprint of everything those outputs depend on (the step's
parameters, the slide file's size and mtime, the upstream step's fingerprint); a slide whose
marker matches and whose outputs exist is skipped. The shard's declared output is the list of
its slides' records, each with its fingerprint, read by the next step and the aggregates.

Every per-slide step (QC, tissue, patch, features) has one command-line skeleton for both kinds
of job: its parser takes the step's parameters, then either one slide's inputs and output files or
a shard's tables, output folders, marker folder and table (`add_outputs`); both build the same
`Item`s, and `execute` runs them — one slide directly, a shard through `run`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from e2epath.core.io import read_json, write_json

logger = logging.getLogger(__name__)


def shard_of(slide_id: str, n_shards: int) -> str:
    """The shard of a slide: stable across runs, machines and cohort sizes."""
    return f"shard{zlib.crc32(slide_id.encode()) % n_shards:04d}"


def assign(slide_ids: Iterable[str], n_shards: int) -> dict[str, list[str]]:
    """shard -> its slides (sheet order); shards without a slide are left out."""
    shards: dict[str, list[str]] = {}
    for sid in slide_ids:
        shards.setdefault(shard_of(sid, n_shards), []).append(sid)
    return dict(sorted(shards.items()))


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_stamp(path: str | Path) -> dict[str, Any]:
    """What a slide file's content is judged by (as Snakemake's mtime trigger judges it)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return {"path": str(path), "missing": err.strerror}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Item:
    """One slide's work in a shard step."""

    slide_id: str
    payload: dict[str, Any]          # everything the outputs depend on
    outputs: list[Path]              # must all exist for the slide to count as done
    work: Callable[[], dict[str, Any]]  # writes the outputs, returns the slide's record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a shard job besides its inputs: the marker folder and the shard table."""
    parser.add_argument("--done-dir", required=True, type=Path, help="this step's per-slide markers")
    parser.add_argument("--out", required=True, type=Path, help="the shard table to write")


# A step's outputs: per-slide option -> (per-shard folder option, file suffix of a slide's file there).
Outputs = dict[str, tuple[str, str]]


def add_outputs(parser: argparse.ArgumentParser, shard: bool, outputs: Outputs) -> None:
    """A per-slide job takes a file per output; a shard job a folder per output, plus the marker
    folder and its table (`add_arguments`)."""
    for name, (folder, _) in outputs.items():
        parser.add_argument("--" + (folder if shard else name).replace("_", "-"), required=True, type=Path)
    if shard:
        add_arguments(parser)


def output_paths(args: argparse.Namespace, shard: bool, outputs: Outputs, slide_id: str) -> dict[str, Path]:
    """The output files of one slide: as given (per-slide job), or ``{folder}/{slide}{suffix}`` (shard)."""
    return {name: getattr(args, folder) / f"{slide_id}{suffix}" if shard else getattr(args, name)
            for name, (folder, suffix) in outputs.items()}


def execute(step: str, items: list[Item], args: argparse.Namespace, shard: bool) -> int:
    """Run a step's items: the one item of a per-slide job, or a shard's (`run`)."""
    if shard:
        return run(step, items, args.done_dir, args.out)
    for item in items:
        item.work()
    return 0


def run(step: str, items: list[Item], done_dir: Path, out: Path) -> int:
    """Run the items not up to date, then write the shard table ``out``.

    A slide whose work raises is logged and the others go on; the job then fails without
    writing ``out`` (the finished slides keep their markers, so a rerun resumes after them).
    """
    records, failed, skipped = [], [], 0
    for item in tqdm(items, desc=f"{step} {out.stem}", unit="slide", mininterval=5, disable=None):
        fp = fingerprint(item.payload)
        marker = done_dir / f"{item.slide_id}.json"
        done = read_json(marker) if marker.is_file() else None
        if done and done.get("fingerprint") == fp and all(p.exists() for p in item.outputs):
            rec = done["record"]
            skipped += 1
        else:
            why = "new" if done is None else "inputs or parameters changed" if done.get("fingerprint") != fp \
                else "an output is missing"
            logger.info("%s %s: running (%s)", step, item.slide_id, why)
            try:
                rec = item.work()
            except Exception:  # noqa: BLE001 - a bug on one slide must not lose the shard's other slides
                logger.exception("%s %s: failed; the shard's other slides go on", step, item.slide_id)
                failed.append(item.slide_id)
                continue
            write_json(marker, {"fingerprint": fp, "record": rec})
        records.append({**rec, "fingerprint": fp})
    logger.info("%s %s: %d slides, %d up to date (skipped), %d run, %d failed", step, out.stem, len(items),
                skipped, len(items) - skipped - len(failed), len(failed))
    if failed:
        logger.error("%s %s: failed on %s; see the tracebacks above, fix, and rerun (finished slides are kept)",
                     step, out.stem, ", ".join(failed))
        return 1
    write_json(out, records)
    return 0
