"""What several test modules build: slide textures, a corrupted JPEG tile, LMDB patch stores with
their manifest rows, small cohorts (a sample sheet with placeholder files; a cohort of stores),
and the tiny workflow config. Everything is written with the real writers (slidewriter, LmdbWriter)
and read back through the real readers (OpenSlide, py-lmdb)."""
from __future__ import annotations

import ast
import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile
import yaml

from e2epath.core.io import write_json
from e2epath.core.layout import RUN_DIR, Run
from e2epath.preprocess.store import LmdbWriter, encode_jpeg, write_empty_store
from e2epath.sources import slidewriter as sw

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "workflow" / "e2epath"
TINY_CONFIG = Path(__file__).resolve().parent / "tiny.yaml"  # also used by .ci/run
# The rules that compute on a GPU, written out here (not read from the workflow): a rule that starts
# or stops asking for one must be added or removed here and in the SLURM profile.
GPU_RULES = {"extract_features", "extract_features_shard", "cohort_extract_features", "cohort_extract_features_shard",
             "train_e2e", "train_twostage", "predict_cohort"}


def tiny_config() -> dict:
    """The tiny demo workflow config (a fresh copy)."""
    return yaml.safe_load(TINY_CONFIG.read_text())


# ------------------------------------------------------------------ slide pixels

def smooth_texture(h: int, w: int, seed: int) -> np.ndarray:
    """Pinkish RGB with low-frequency structure, so that misplaced reads are visible."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 255, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    field = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    base = np.array([200, 120, 170], np.float32)
    return np.clip(base + (field.astype(np.float32) - 128) * 0.35, 0, 255).astype(np.uint8)


def block_texture(h: int, w: int, seed: int) -> np.ndarray:
    """Hard-edged 16-px blocks of random colour: any resampling or sub-pixel shift shows."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)[:h, :w]
    return (img // 2 + np.array([110, 60, 90], np.uint8)).astype(np.uint8)


def corrupt_tile(path: Path, col: int, row: int, seed: int = 0) -> tuple[int, int]:
    """Overwrite the middle of level 0's JPEG tile (col, row) in place (found through the TIFF
    offsets); returns the tile's (offset, byte count)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        k = row * -(-page.imagewidth // sw.TILE) + col
        offset, count = int(page.dataoffsets[k]), int(page.databytecounts[k])
    with open(path, "r+b") as f:
        f.seek(offset + count // 3)
        f.write(np.random.default_rng(seed).integers(0, 256, count // 3, dtype=np.uint8).tobytes())
    return offset, count


# ------------------------------------------------------------------ patch stores

def write_store(folder: Path, slide: str, mag: int, patches: list[np.ndarray], status: str = "ok",
                message: str = "", x_step: int | None = None) -> Path:
    """A real LMDB patch store at ``folder/lmdb/{mag}x/{slide}.lmdb`` and its manifest row at
    ``folder/patches/{mag}x/{slide}.json`` (as the patch step writes them); returns the row's path.
    Patch i sits at level-0 (i * x_step, 0); a store that is not ok holds no patches."""
    size = patches[0].shape[0] if patches else 32
    x_step = size if x_step is None else x_step
    lmdb_path = folder / f"lmdb/{mag}x/{slide}.lmdb"
    meta = {"slide_id": slide, "magnification": mag, "mpp": 10 / mag, "slide_mpp": 0.25, "patch_size": size,
            "read_level": 0, "read_downsample": 1.0, "read_mpp": 0.25, "scale": 1.0, "jpeg_quality": 95,
            "status": status, "message": message}
    if status == "ok":
        with LmdbWriter(lmdb_path, capacity_bytes=1 << 22) as writer:
            for i, rgb in enumerate(patches):
                writer.add(encode_jpeg(rgb, 95), (i * x_step, 0), 1.0)
            writer.close(meta)
    else:
        write_empty_store(lmdb_path, meta)
    row = folder / f"patches/{mag}x/{slide}.json"
    write_json(row, {"slide_id": slide, "magnification": mag, "status": status,
                     "n_patches": len(patches) if status == "ok" else 0, "lmdb": str(lmdb_path),
                     "mpp": 10 / mag, "read_level": 0, "read_downsample": 1.0, "message": message or None})
    return row


def patch_image(rng: np.random.Generator, positive: bool, signal: bool, size: int = 32) -> np.ndarray:
    """A noisy pink patch; signal patches of positive cases are dark purple."""
    base = np.array([48, 18, 92] if positive and signal else [234, 158, 196], np.float32)
    img = base + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_store_cohort(root: Path, n_cases: int = 12, mags=(10, 20), sizes=None, failed=(), seed: int = 0) -> dict:
    """Cases CASE-00..; even cases negative; case 1 has two slides; ``failed`` cases' stores failed.

    ``sizes``: {(case index, mag): n_patches} overrides the default 6 (10x) / 12 (20x) per slide.
    Returns paths: slides (sheet), labels, survival, rows (manifest row JSON paths), cases.
    """
    rng = np.random.default_rng(seed)
    sheet, rows, labels, surv = [], [], [], []
    for c in range(n_cases):
        case, positive = f"CASE-{c:02d}", c % 2 == 1
        labels.append((case, "positive" if positive else "negative"))
        surv.append((case, float(10 + 7 * c % 50), int(c % 3 != 0)))
        for s in range(2 if c == 1 else 1):
            slide = f"S{c:02d}{s}"
            sheet.append((slide, f"slides/{slide}.svs", case))
            for mag in mags:
                n = (sizes or {}).get((c, mag), 6 if mag == 10 else 12)
                if case in failed:
                    rows.append(write_store(root / "results", slide, mag, [], status="failed", message="unreadable"))
                else:
                    images = [patch_image(rng, positive, i % 3 == 0) for i in range(n)]
                    rows.append(write_store(root / "results", slide, mag, images))
    paths = {"slides": root / "slides.tsv", "labels": root / "labels.csv", "survival": root / "survival.csv"}
    pd.DataFrame(sheet, columns=["slide_id", "path", "case_id"]).to_csv(paths["slides"], sep="\t", index=False)
    pd.DataFrame(labels, columns=["case_id", "label"]).to_csv(paths["labels"], index=False)
    pd.DataFrame(surv, columns=["case_id", "time", "event"]).to_csv(paths["survival"], index=False)
    return {**paths, "rows": rows, "cases": [c for c, _ in labels]}


# ------------------------------------------------------------------ training runs

def write_run(root: Path, family: str, task: str, task_type: str, method: str, fold: int,
              predictions: pd.DataFrame, history: pd.DataFrame | None = None,
              attention: dict[str, np.ndarray] | None = None) -> Run:
    """A training run's folder under ``root`` (e2epath.layout) with the given tables and its run.json."""
    run = Run(family, task, task_type, method, fold,
              root / RUN_DIR.format(family=family, task=task, method=method, fold=fold))
    run.folder.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(run.path("predictions"), sep="\t", index=False)
    if history is not None:
        history.to_csv(run.path("history"), sep="\t", index=False)
    if attention is not None:
        np.savez(run.path("attention"), **attention)
    run.write()
    return run


# ------------------------------------------------------------------ a sample sheet and its config

def write_sheet_cohort(d: Path, rows=None, subtype=None, survival=None) -> dict:
    """A valid small cohort's sheet, label tables and config (placeholder slide files suffice:
    validation checks that they exist)."""
    (d / "slides").mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [("S1", "slides/S1.svs", "C1"), ("S2", "slides/S2.svs", "C1"),
                                          ("S3", "slides/S3.svs", "C2")]
    for _, path, _ in rows:
        if path:
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_bytes(b"x")
    sheet = "slide_id\tpath\tcase_id\n" + "".join(f"{s}\t{p}\t{c}\n" for s, p, c in rows)
    (d / "slides.tsv").write_text(sheet)
    (d / "subtype.csv").write_text(subtype if subtype is not None else "case_id,label\nC1,a\nC2,b\n")
    (d / "surv.csv").write_text(survival if survival is not None else "case_id,time,event\nC1,10.5,1\nC2,3,0\n")
    return {"samples": str(d / "slides.tsv"),
            "tasks": {"subtype": {"type": "classification", "labels": str(d / "subtype.csv")},
                      "surv": {"type": "survival", "labels": str(d / "surv.csv")}},
            "e2e": {"methods": {"m": {"encoder": "resnet18", "aggregator": "abmilx"}}}}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------ the package's imports (ast)

def module_path(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """File of module ``e2epath.x.y`` (a module or a package's __init__), None if it is no module."""
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guards_import_error(handler: ast.ExceptHandler) -> bool:
    names = [] if handler.type is None else (
        handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type])
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def imported_names(path: Path, module: str | None) -> set[str]:
    """Absolute names imported anywhere in ``path`` (``module`` resolves relative imports),
    leaving out imports inside `try` blocks that catch ImportError."""
    tree = ast.parse(path.read_text(), str(path))
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_guards_import_error(h) for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = (module or "").split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return names


# ------------------------------------------------------------------ the workflow, parsed

def load_workflow(stack: ExitStack, **config):
    """The workflow parsed in-process by Snakemake's API (the demo config, with ``config`` on top)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    api = stack.enter_context(SnakemakeApi(OutputSettings(quiet=None)))
    wapi = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(config=config),
                        storage_settings=StorageSettings(), snakefile=ROOT / "Snakefile", workdir=ROOT)
    return wapi._workflow


@contextmanager
def parsed_workflows(gpus: int | None = None):
    """The workflow parsed with the demo config: one job per slide, and with shards (every rule);
    with ``gpus``, as a host with that many GPUs parses it (the GPU rules ask for one)."""
    import os

    saved = {k: os.environ.pop(k, None) for k in ("E2EPATH_GPU_COUNT", "CUDA_VISIBLE_DEVICES")}
    if gpus is not None:
        os.environ["E2EPATH_GPU_COUNT"] = str(gpus)
    try:
        with ExitStack() as stack:
            yield {"per-slide": load_workflow(stack), "sharded": load_workflow(stack, preprocess={"shards": 3})}
    finally:
        os.environ.pop("E2EPATH_GPU_COUNT", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
