"""Slide-level attention maps: per slide, the files `python -m e2epath predict` writes next to its
prediction, and the workflow step that writes them for every slide of training runs' or external
cohort predictions' attention files:

    python -m e2epath slide_maps --attention A.npz [B.npz ...] --slides results/slides.tsv
        --rows ROW... --contours-dir DIR --out-dir DIR --map-mpp 8 --top-k 8

Per slide (names: `e2epath.layout.PREDICT_FILES`):

- `{slide}.attention.png`: the attention map over the slide at `--map-mpp` µm/px (2 or coarser),
  percentile colour scale within the slide, tissue contours drawn (`figures.heatmaps`);
- `{slide}.montage.png`: the `--top-k` most and least attended patches with their level-0 coords;
- `{slide}.attention.geojson`: the patches as QuPath detections, `properties.measurements` the
  attention of each head ("attention head h"; with several attention files holding the slide — the
  fold models of a method predicting one external cohort — "attention model k head h", k the
  file's position among them) and "attention mean" (the mean over heads, then over files).

and `index.tsv` (`e2epath.layout.MAPS_INDEX`): slide_id, n_patches, status (ok | failed), message,
map, montage, geojson. The slide image and mpp come from the QC table, the tissue contours from
`{contours-dir}/{slide}.geojson`, the patches of the montage and the patch size from the store of
the slide's `--rows` entry (patch manifest rows or shard tables) at the attention files'
`__magnification__` — or, with a bare `--rows`, `{lmdb-dir}/{mag}x/{slide}.lmdb` —, matched to the
attention by coordinates when the orders differ. A slide that cannot be drawn (QC failed, slide file unreadable, store missing,
damaged or not matching, attention files disagreeing) gets a `failed` row with the reason and no
files; the others go on. The folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from e2epath.core.io import read_json, read_records, replace_dir, write_bytes
from e2epath.core.layout import MAPS_INDEX, PATCH_STORE, PREDICT_FILES, TISSUE_CONTOURS
from e2epath.figures.heatmaps import MIN_MAP_MPP, patch_montage, slide_heatmap, tissue_rings, write_geojson
from e2epath.preprocess.store import LmdbReader, close_all
from e2epath.slide.reader import SlideError
from e2epath.train.attention import read_heads, slide_ids

logger = logging.getLogger(__name__)

MAP_FILES = ("map", "montage", "geojson")  # the PREDICT_FILES this module writes
INDEX_COLUMNS = ("slide_id", "n_patches", "status", "message", *MAP_FILES)


class MapError(ValueError):
    """A slide whose maps cannot be drawn; the message says why."""


# ------------------------------------------------------------------ one slide's files


def measurements(attentions: list[np.ndarray]) -> dict[str, np.ndarray]:
    """QuPath measurement columns: each head of each model, and the mean over heads and models."""
    out: dict[str, np.ndarray] = {}
    for m, attn in enumerate(attentions):
        for h, values in enumerate(attn):
            name = f"attention head {h + 1}" if len(attentions) == 1 else f"attention model {m + 1} head {h + 1}"
            out[name] = values
    out["attention mean"] = np.mean([a.mean(axis=0) for a in attentions], axis=0)
    return out


def patch_side_l0(meta: dict[str, Any]) -> float:
    """A store's patch side in level-0 px: output px × level px per output px × level-0 px per level px."""
    return float(meta["patch_size"] * meta["scale"] * meta["read_downsample"])


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_slide_maps(out_dir: Path, slide: str, slide_path: str | Path, slide_mpp: float, coords: np.ndarray,
                     measurements: dict[str, np.ndarray], patch_l0: float, rings: list,
                     get_rgb: Callable[[int], np.ndarray], map_mpp: float, top_k: int,
                     properties: dict[str, Any]) -> dict[str, str]:
    """The map PNG, the montage PNG and the GeoJSON of one slide into ``out_dir``; returns their
    file names (keys of `PREDICT_FILES`).

    ``coords``: [N, 2] level-0 x, y of the patches; ``measurements``: name → [N] values (with an
    "attention mean", which colours the map and orders the montage); ``rings``: tissue contours
    (`heatmaps.tissue_rings`); ``get_rgb(i)``: patch i (of ``coords``) as RGB; ``properties``: the
    GeoJSON FeatureCollection's properties. Streams: no full-resolution raster is built."""
    out_dir = Path(out_dir)
    files = {k: PREDICT_FILES[k].format(slide=slide) for k in MAP_FILES}
    coords = np.asarray(coords, np.int64)
    mean = measurements["attention mean"]
    rgb = slide_heatmap(slide_path, slide_mpp, coords, mean, patch_l0, map_mpp, rings)
    write_bytes(out_dir / files["map"], png(rgb))
    del rgb
    order = np.argsort(-mean, kind="stable")
    k = min(top_k, len(order))
    picks = list(order[:k]) + [i for i in order[::-1][:k] if i not in set(order[:k])]
    labels = [f"{'top' if n < k else 'low'} {coords[i, 0]},{coords[i, 1]}" for n, i in enumerate(picks)]
    write_bytes(out_dir / files["montage"], png(patch_montage([get_rgb(int(i)) for i in picks], labels,
                                                              cols=max(k, 1))))
    write_geojson(out_dir / files["geojson"], coords, patch_l0, measurements, properties)
    return files


# ------------------------------------------------------------------ the workflow step


@dataclass
class _Source:
    """One open attention file."""

    path: Path
    npz: Any
    magnification: int
    slides: list[str] = field(default_factory=list)


def _open_sources(stack: ExitStack, paths: list[Path]) -> list[_Source]:
    sources = []
    for path in paths:
        try:
            npz = stack.enter_context(np.load(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable attention file ({type(err).__name__}: {err})") from err
        if "__magnification__" not in npz.files:
            raise ValueError(f"{path}: no __magnification__ (see docs/contracts.md attention.npz)")
        sources.append(_Source(path, npz, int(npz["__magnification__"]), slide_ids(npz)))
    return sources


def _qc_rows(path: Path) -> dict[str, dict[str, Any]]:
    table = pd.read_csv(path, sep="\t", dtype={"slide_id": str})
    missing = {"slide_id", "path", "status", "mpp"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a QC table (no {', '.join(sorted(missing))} column)")
    table = table.astype(object).where(table.notna(), None)
    return {r["slide_id"]: r for r in table.to_dict(orient="records")}


def _store_index(store: LmdbReader, coords: np.ndarray, source: Path) -> Callable[[int], int]:
    """Attention patch i → the store's index of the patch at its coords."""
    have = store.coords.astype(np.int64)
    if np.array_equal(have, coords):
        return int
    if not len(have):
        raise MapError(f"the patch store {store.path} holds no patches; {source} has {len(coords)}")

    def key(c: np.ndarray) -> np.ndarray:  # one int64 per (x, y)
        return (c[:, 0] << 32) | (c[:, 1] & 0xFFFFFFFF)

    keys, want = key(have), key(coords)
    order = np.argsort(keys, kind="stable")
    pos = np.minimum(np.searchsorted(keys, want, sorter=order), len(keys) - 1)
    absent = int(np.count_nonzero(keys[order[pos]] != want))
    if absent:
        raise MapError(f"{absent} of the {len(coords)} patches of {source} are not in the store {store.path} "
                       "(the store was rebuilt after the attention was computed); rerun the attention's job")
    logger.info("%s: attention patch order differs from the store %s; patches matched by coordinates",
                source, store.path)
    index = order[pos]
    return lambda i: int(index[i])


def _store(slide: str, mag: int, args: argparse.Namespace, rows: dict[tuple[str, int], dict]) -> LmdbReader:
    row = rows.get((slide, mag))
    if row is not None:
        if row.get("status") != "ok":
            raise MapError(f"no {mag}x patches: {row.get('status')}: {row.get('message')}")
        path = Path(row["lmdb"])
    elif args.lmdb_dir is not None:
        pattern = Path(PATCH_STORE)  # {mag}x/{slide}.lmdb under the stores' folder
        path = args.lmdb_dir / pattern.parent.name.format(mag=mag) / pattern.name.format(slide=slide)
    else:
        raise MapError(f"no {mag}x manifest row among --rows")
    if not path.is_file():
        raise MapError(f"patch store {path} not found")
    store = LmdbReader(path)
    meta = store.meta
    if meta.get("status") != "ok":
        raise MapError(f"patch store {path} has no patches: {meta.get('status')}: {meta.get('message')}")
    if int(meta.get("magnification", mag)) != mag:
        raise MapError(f"patch store {path} holds {meta['magnification']}x patches, the attention {mag}x")
    return store


def _rings(slide: str, contours_dir: Path) -> tuple[list, str]:
    path = contours_dir / Path(TISSUE_CONTOURS).name.format(slide=slide)
    if not path.is_file():
        logger.warning("slide %s: no tissue contours (%s missing); drawn without", slide, path)
        return [], f"no tissue contours ({path} missing)"
    try:
        return tissue_rings(read_json(path)), ""
    except (OSError, ValueError, AttributeError, TypeError) as err:
        logger.warning("slide %s: tissue contours %s unreadable (%s); drawn without", slide, path, err)
        return [], f"tissue contours unreadable ({path}: {err})"


def _slide_maps(slide: str, sources: list[_Source], qc: dict[str, dict], rows: dict, args: argparse.Namespace,
                out: Path, row: dict[str, Any]) -> None:
    """One slide's files into ``out``; fills ``row`` (n_patches, message, file names)."""
    heads, coords, first = [], None, None
    for src in sources:
        att, xy = read_heads(src.npz, slide, str(src.path))
        if first is None:
            coords, first = xy, src
            row["n_patches"] = len(xy)
        elif src.magnification != first.magnification:
            raise MapError(f"{first.path} is at {first.magnification}x and {src.path} at {src.magnification}x")
        elif not np.array_equal(xy, coords):
            raise MapError(f"the patch coords of {first.path} and {src.path} differ ({len(coords)} and {len(xy)} "
                           "patches): their attention is not over the same patches")
        heads.append(att)
    if not len(coords):
        raise MapError(f"{first.path}: no patches")
    rec = qc.get(slide)
    if rec is None:
        raise MapError(f"not in the QC table {args.slides}")
    if rec["status"] != "ok":
        raise MapError(f"slide QC failed: {rec.get('error')}")
    if rec.get("mpp") is None:
        raise MapError(f"the QC table {args.slides} gives no mpp")
    mag = first.magnification
    store = _store(slide, mag, args, rows)
    index = _store_index(store, coords, first.path)
    patch_l0 = patch_side_l0(store.meta)
    rings, note = _rings(slide, args.contours_dir)
    props = {"slide_id": slide, "magnification": mag, "patch_size_level0": patch_l0,
             "attention_files": [str(s.path) for s in sources]}
    files = write_slide_maps(out, slide, rec["path"], float(rec["mpp"]), coords, measurements(heads), patch_l0,
                             rings, lambda i: store.get_rgb(index(i)), args.map_mpp, args.top_k, props)
    row.update(files, message=note)


def _write_maps(args: argparse.Namespace, sources: list[_Source], out: Path) -> pd.DataFrame:
    qc = _qc_rows(args.slides)
    rows = {(r["slide_id"], int(r["magnification"])): r for r in read_records(args.rows or [])
            if isinstance(r, dict) and "slide_id" in r and "magnification" in r}
    holders: dict[str, list[_Source]] = {}
    for src in sources:
        for slide in src.slides:
            holders.setdefault(slide, []).append(src)
    records = []
    for slide in tqdm(sorted(holders), desc="slide maps", unit="slide"):
        row: dict[str, Any] = {"slide_id": slide, "n_patches": None, "status": "ok", "message": "",
                               **{k: "" for k in MAP_FILES}}
        try:
            _slide_maps(slide, holders[slide], qc, rows, args, out, row)
        except Exception as err:  # noqa: BLE001 - one bad slide never stops the others
            expected = isinstance(err, (MapError, SlideError, OSError, ValueError, KeyError))
            (logger.error if expected else logger.exception)("slide %s: no maps — %s", slide, err)
            for name in MAP_FILES:  # what was written before the failure goes
                (out / PREDICT_FILES[name].format(slide=slide)).unlink(missing_ok=True)
            row.update(status="failed", message=str(err) if expected else f"{type(err).__name__}: {err}",
                       **{k: "" for k in MAP_FILES})
        records.append(row)
    close_all()
    index = pd.DataFrame(records, columns=list(INDEX_COLUMNS))
    index["n_patches"] = index["n_patches"].astype("Int64")
    index.to_csv(out / MAPS_INDEX, sep="\t", index=False)
    return index


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath slide_maps", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--attention", nargs="+", required=True, type=Path,
                    help="attention.npz files (training runs' or an external cohort's fold models')")
    ap.add_argument("--slides", required=True, type=Path,
                    help="the QC table results/slides.tsv (slide paths, mpp, QC status)")
    ap.add_argument("--contours-dir", required=True, type=Path, help="folder of the {slide}.geojson tissue contours")
    ap.add_argument("--lmdb-dir", type=Path, default=None,
                    help="folder of the {mag}x/{slide}.lmdb patch stores (not needed with --rows)")
    ap.add_argument("--rows", nargs="*", type=Path, required=True,
                    help="patch manifest rows or shard tables: the stores are their `lmdb` paths (a bare --rows: "
                         "the stores are found under --lmdb-dir)")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--map-mpp", type=float, required=True, help=f"map resolution, µm/px ({MIN_MAP_MPP:g} or coarser)")
    ap.add_argument("--top-k", type=int, required=True, help="most and least attended patches in the montage")
    args = ap.parse_args(argv)
    if args.map_mpp < MIN_MAP_MPP:
        ap.error(f"--map-mpp {args.map_mpp:g} µm/px is finer than the {MIN_MAP_MPP:g} µm/px e2epath renders "
                 "(a full slide at that resolution is too large); give 2 or more")
    if args.top_k < 1:
        ap.error("--top-k must be ≥ 1")
    if args.lmdb_dir is None and not args.rows:
        ap.error("give the stores: --rows ROW... or --lmdb-dir")
    summary: dict[str, Any] = {}
    try:
        with ExitStack() as stack:
            sources = _open_sources(stack, list(dict.fromkeys(args.attention)))
            replace_dir(args.out_dir, lambda tmp: summary.update(index=_write_maps(args, sources, tmp)))
    except (OSError, ValueError) as err:  # bad input files: say which and why, no traceback
        logger.error("%s", err)
        return 2
    index = summary["index"]
    ok = int((index["status"] == "ok").sum())
    logger.info("slide maps of %d slides from %d attention files: %d written, %d failed (see %s); at %g µm/px, "
                "top/bottom %d patches → %s", len(index), len(args.attention), ok, len(index) - ok,
                MAPS_INDEX, args.map_mpp, args.top_k, args.out_dir)
    return 0
