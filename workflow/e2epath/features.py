"""Frozen-encoder feature extraction for the two-stage baseline (one slide per job).

All patches of the configured magnification (falling back, with a message, to the finest
available coarser one the rule passes) go through the frozen encoder in batches under no_grad —
AMP and channels_last on CUDA. Features are stored as float16 with the patches' level-0
coordinates. The next batches are decoded in background threads while the encoder runs
(OpenCV releases the GIL), in a fixed order, so the output does not depend on the thread count.
A slide without usable patches still gets a file: status ``skipped`` (or ``failed`` when a patch
cannot be decoded) and a message; train_mil leaves it out.
"""
from __future__ import annotations

import argparse
import functools
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import shards
from .data import IMAGENET_MEAN, IMAGENET_STD, resize
from .io import atomic_path, read_json, read_records
from .preprocess.store import LmdbReader, decode_jpeg
from .train.fold import encoder_from_spec
from .train.loop import device

logger = logging.getLogger(__name__)


def choose_row(rows: list[dict], magnification: int) -> tuple[dict | None, str]:
    """The configured magnification's row, else the finest one that is ok; and why not the first."""
    by_mag = {int(float(r["magnification"])): r for r in rows}
    wanted = by_mag.get(magnification)
    if wanted and wanted["status"] == "ok":
        return wanted, ""
    why = (f"{magnification}x is {wanted['status']}" + (f" ({wanted['message']})" if wanted.get("message") else "")
           if wanted else f"{magnification}x has no manifest row")
    ok = sorted((m for m, r in by_mag.items() if r["status"] == "ok"), reverse=True)
    if not ok:
        return None, f"{why}; no magnification is usable, slide skipped"
    return by_mag[ok[0]], f"{why}; falling back to {ok[0]}x"


def decode_batch(jpegs: list[bytes], input_size: int, first: int, where: str) -> Tensor:
    """JPEG bytes → uint8 [B, H, W, 3] at ``input_size`` (runs in a worker thread)."""
    out = np.empty((len(jpegs), input_size, input_size, 3), np.uint8)
    for k, data in enumerate(jpegs):
        try:
            out[k] = resize(decode_jpeg(data), input_size)
        except ValueError as err:
            raise ValueError(f"{where}: patch {first + k}: {err}; re-run the patch rule for this slide") from err
    return torch.from_numpy(out)


class PatchBatches:
    """A store's patches as uint8 [B, H, W, 3] batches, in order, ``workers`` batches ahead.

    JPEG bytes are read from LMDB in the calling thread (the store's shared environment is not
    thread-safe to open) and decoded + resized in the pool. ``workers=0`` decodes inline.
    """

    def __init__(self, store: LmdbReader, input_size: int, batch_size: int, workers: int = 2) -> None:
        self.store, self.input_size, self.batch_size, self.workers = store, input_size, batch_size, workers
        self.starts = range(0, len(store), batch_size)

    def __len__(self) -> int:
        return len(self.starts)

    def _jpegs(self, start: int) -> list[bytes]:
        return [self.store.get_jpeg(i) for i in range(start, min(start + self.batch_size, len(self.store)))]

    def __iter__(self) -> Iterator[Tensor]:
        where = str(self.store.path)
        if self.workers <= 0:
            for start in self.starts:
                yield decode_batch(self._jpegs(start), self.input_size, start, where)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            todo = iter(self.starts)
            for start in todo:  # keep one batch per worker in flight, plus the one being used
                pending.append(pool.submit(decode_batch, self._jpegs(start), self.input_size, start, where))
                if len(pending) > self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def normalise(batch: Tensor, dev: torch.device) -> Tensor:
    """uint8 [B, H, W, 3] → ImageNet-normalised float [B, 3, H, W] on ``dev`` (uint8 travels:
    4× less host→device traffic); channels_last on CUDA, which is also the uint8 layout."""
    x = batch.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.as_tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)


@torch.no_grad()
def extract(encoder: nn.Module, store: LmdbReader, input_size: int, batch_size: int,
            dev: torch.device, workers: int = 2) -> Tensor:
    """float16 [N, out_dim] features of every patch of ``store``, in store order."""
    encoder.eval()
    cuda = dev.type == "cuda"
    if cuda:  # the same algorithms every run: same input → same features
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    feats = []
    batches = PatchBatches(store, input_size, batch_size, workers)
    for batch in tqdm(batches, desc=store.meta["slide_id"], total=len(batches)):
        if cuda:
            batch = batch.pin_memory()
        with torch.autocast(dev.type, enabled=cuda):
            feats.append(encoder(normalise(batch, dev)).half().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, encoder.out_dim, dtype=torch.float16)


def build_frozen_encoder(name: str, weights: str | None, seed: int, dev: torch.device) -> nn.Module:
    """Eval-mode encoder without gradients; random init seeded, so every slide's job builds the
    same one and features of different slides are comparable."""
    encoder = encoder_from_spec(name, weights, seed).to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


def record(slide: str, status: str, message: str, magnification: int | None = None,
           features: Tensor | None = None, coords: np.ndarray | None = None) -> dict:
    """The .pt content (CONTRACTS.md "Features")."""
    return {"slide_id": slide, "status": status, "message": message, "magnification": magnification,
            "features": features if features is not None else torch.zeros(0, 0, dtype=torch.float16),
            "coords": torch.from_numpy(np.ascontiguousarray(coords, np.int32)) if coords is not None
            else torch.zeros(0, 2, dtype=torch.int32)}


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--magnification", type=int, required=True)
    ap.add_argument("--weights", default="auto", help="auto | imagenet | None | a state-dict file")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads (0: decode inline)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


class Extractor:
    """Features of one slide at a time from its manifest rows; the encoder is built at first use."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dev = device()
        self.encoder: nn.Module | None = None

    def __call__(self, slide: str, rows: list[dict], out: str | Path) -> dict:
        """Write ``out`` (the .pt record) and return its status: ok, skipped or failed."""
        a = self.a
        row, message = choose_row(rows, a.magnification)
        if message:
            logger.warning("slide %s: %s", slide, message)
        if row is None:
            rec = record(slide, "skipped", message)
        else:
            if self.encoder is None:
                weights = None if a.weights in ("None", "null") else a.weights
                self.encoder = build_frozen_encoder(a.encoder, weights, a.seed, self.dev)
            store = LmdbReader(row["lmdb"])
            mag = int(float(row["magnification"]))
            try:
                feats = extract(self.encoder, store, a.input_size, a.batch_size, self.dev, a.workers)
                rec = record(slide, "ok", message, mag, feats, store.coords)
                logger.info("slide %s: %d patches at %dx → features %s", slide, len(feats), mag, tuple(feats.shape))
            except (ValueError, KeyError) as err:  # a damaged store is this slide's problem, not the run's
                logger.error("slide %s: %s", slide, err)
                rec = record(slide, "failed", str(err), mag)
        with atomic_path(out) as tmp:
            torch.save(rec, tmp)
        return {"slide_id": slide, "status": rec["status"], "message": rec["message"], "path": str(out)}


def cli(argv: list[str] | None = None) -> int:
    ap = _parser("e2epath extract_features")
    ap.add_argument("--rows", nargs="+", required=True,
                    help="this slide's manifest rows: the configured magnification and its fallbacks")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = [read_json(p) for p in a.rows]
    slides = sorted({r["slide_id"] for r in rows})
    if len(slides) != 1:
        ap.error(f"--rows must all belong to one slide, got {slides}")
    Extractor(a)(slides[0], rows, a.out)
    return 0


def cli_shard(argv: list[str] | None = None) -> int:
    """Features of the slides of one shard (e2epath.shards); records carry the .pt path."""
    ap = _parser("e2epath extract_features_shard")
    ap.add_argument("--rows", nargs="+", required=True, type=Path,
                    help="the shard's patch tables: the configured magnification and its fallbacks")
    ap.add_argument("--feature-dir", required=True, type=Path)
    ap.add_argument("--done-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    rows: dict[str, list[dict]] = {}
    for row in read_records(a.rows):
        rows.setdefault(row["slide_id"], []).append(row)
    weights = shards.file_stamp(a.weights) if Path(a.weights).is_file() else a.weights
    params = {"encoder": a.encoder, "magnification": a.magnification, "weights": weights,
              "input_size": a.input_size, "batch_size": a.batch_size, "seed": a.seed}
    extractor = Extractor(a)
    items = []
    for slide, slide_rows in rows.items():
        out = a.feature_dir / f"{slide}.pt"
        payload = {"step": "features", **params, "rows": sorted(r["fingerprint"] for r in slide_rows)}
        items.append(shards.Item(slide, payload, [out], functools.partial(extractor, slide, slide_rows, out)))
    return shards.run("features", items, a.done_dir, a.out)
