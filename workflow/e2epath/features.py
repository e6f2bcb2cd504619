"""Frozen-encoder feature extraction for the two-stage baseline (one slide per job).

All patches of the configured magnification (falling back, with a message, to the finest
available one) go through the frozen encoder in batches under no_grad — AMP and channels_last
on CUDA. Features are stored as float16 with the patches' level-0 coordinates.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from tqdm import tqdm

from .data import resize, to_tensor
from .io import atomic_path, read_json
from .preprocess.store import LmdbReader
from .train.fold import encoder_from_spec
from .train.loop import device

logger = logging.getLogger(__name__)


def choose_row(rows: list[dict], magnification: int) -> tuple[dict | None, str]:
    """The configured magnification's row, else the finest one that is ok."""
    by_mag = {int(r["magnification"]): r for r in rows}
    wanted = by_mag.get(magnification)
    if wanted and wanted["status"] == "ok":
        return wanted, ""
    ok = sorted((m for m, r in by_mag.items() if r["status"] == "ok"), reverse=True)
    why = f"{magnification}x is {wanted['status'] if wanted else 'not configured'}"
    if not ok:
        return None, f"{why} and no magnification is usable"
    return by_mag[ok[0]], f"{why}; falling back to {ok[0]}x"


@torch.no_grad()
def extract(encoder: torch.nn.Module, store: LmdbReader, input_size: int, batch_size: int,
            dev: torch.device) -> np.ndarray:
    encoder.eval()
    feats = []
    for start in tqdm(range(0, len(store), batch_size), desc=store.meta["slide_id"]):
        stop = min(start + batch_size, len(store))
        x = to_tensor(np.stack([resize(store.get_rgb(i), input_size) for i in range(start, stop)])).to(dev)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            feats.append(encoder(x).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, encoder.out_dim), np.float32)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="e2epath extract_features")
    ap.add_argument("--rows", nargs="+", required=True, help="this slide's manifest rows")
    ap.add_argument("--out", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--magnification", type=int, required=True)
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rows = [read_json(p) for p in a.rows]
    row, message = choose_row(rows, a.magnification)
    slide = rows[0]["slide_id"]
    record = {"slide_id": slide, "status": "skipped", "message": message, "magnification": None,
              "features": torch.zeros(0, 0, dtype=torch.float16), "coords": torch.zeros(0, 2, dtype=torch.int32)}
    if message:
        logger.warning("slide %s: %s", slide, message)
    if row is not None:
        dev = device()
        encoder = encoder_from_spec(a.encoder, None if a.weights in ("None", "null") else a.weights, a.seed).to(dev)
        if dev.type == "cuda":
            encoder = encoder.to(memory_format=torch.channels_last)
        store = LmdbReader(row["lmdb"])
        feats = extract(encoder, store, a.input_size, a.batch_size, dev)
        record.update(status="ok", magnification=int(row["magnification"]),
                      features=torch.from_numpy(feats).half(), coords=torch.from_numpy(store.coords.copy()))
        logger.info("slide %s: %d patches at %sx → %s features", slide, len(feats), row["magnification"], feats.shape)
    with atomic_path(a.out) as tmp:
        torch.save(record, tmp)
    return 0
