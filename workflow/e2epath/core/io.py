"""Atomic file outputs and small JSON helpers shared by every stage.

Every output is written to a temporary name in the same folder (same file system, so the final
``os.replace`` is atomic) and renamed only when complete: a killed job never leaves a file that a
rerun would accept.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def tmp_name(path: str | Path) -> Path:
    """The temporary sibling of ``path`` used while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries a killed writer of ``path`` left behind (``.{name}.tmp-PID``).

    Only the job that produces ``path`` writes it (Snakemake runs one job per output at a time),
    so any temporary of ``path`` that is not this process's own is a leftover. Returns them.
    """
    path = Path(path)
    mine = tmp_name(path)
    stale = [p for p in path.parent.glob(f".{path.name}.tmp-*") if p != mine] if path.parent.is_dir() else []
    for p in stale:
        _remove(p)
    return stale


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the exception
    propagates; ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise FileNotFoundError(f"{tmp} was not written; refusing to create {path}")
    os.replace(tmp, path)


def replace_dir(folder: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a folder whole: ``fill`` a temporary sibling of ``folder``, then put it in place of
    ``folder`` (an older one is removed only once the new one is complete)."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        fill(tmp)
        if folder.exists():  # a rerun by hand: os.replace cannot overwrite a full folder
            shutil.rmtree(folder)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file; the error names the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_records(paths: Iterable[str | Path]) -> list[Any]:
    """Records from per-slide JSONs (one record each) and shard tables (a list of records each)."""
    records: list[Any] = []
    for path in paths:
        obj = read_json(path)
        records += obj if isinstance(obj, list) else [obj]
    return records


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table_cli(argv: list[str] | None, prog: str, fields: tuple[str, ...], what: str) -> int:
    """`{prog} --out TABLE.tsv RECORD...`: the records of per-slide JSONs / shard tables in one TSV."""
    import argparse
    import logging

    p = argparse.ArgumentParser(prog=prog, description=f"Aggregate {what} into one TSV (lists JSON-encoded).")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("jsons", nargs="*", type=Path)
    a = p.parse_args(argv)
    n = json_rows_to_tsv(a.jsons, fields, a.out)
    logging.getLogger(__name__).info("wrote %d %s to %s", n, what, a.out)
    return 0


def json_rows_to_tsv(paths: list[Path], fields: tuple[str, ...], out: str | Path) -> int:
    """Aggregate the records of per-slide JSONs / shard tables into a TSV (lists JSON-encoded,
    None empty), atomically; returns the number of rows."""
    import csv

    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(fields)
        records = read_records(paths)
        for rec in records:
            writer.writerow([_cell(rec.get(k)) for k in fields])
    return len(records)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
