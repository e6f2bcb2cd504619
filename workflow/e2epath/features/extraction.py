"""Frozen-encoder feature extraction for the two-stage baseline, per slide (one job per slide, or
one per shard of slides with preprocess.shards).

All patches of the configured magnification (falling back, with a message, to the finest
available coarser one the rule passes) go through the frozen encoder (a preset of
`e2epath.presets`, as the config changes it) in batches under no_grad — on CUDA in the preset's
dtype (bf16 / fp16 autocast, fp32) and channels_last. Each stored patch is resized whole to the
preset's input size and normalised with its statistics (`transforms.model_inputs`, on the
encoder's device). Features are stored as float16 with the
patches' level-0 coordinates. The next batches are decoded in background threads while the
encoder runs (OpenCV releases the GIL), in a fixed order, so the output does not depend on the
thread count. A slide without usable patches still gets a file: status ``skipped`` (or
``failed`` when a patch cannot be decoded) and a message; two-stage training leaves it out.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from e2epath.core import seeds
from e2epath.core.devices import torch_device
from e2epath.core.io import read_records
from e2epath.core.vocabulary import MAGNIFICATIONS
from e2epath.data.decoding import PatchBatches
from e2epath.data.transforms import model_inputs
from e2epath.features.files import record, write_features
from e2epath.models.presets import PRESETS, EncoderError, encoder_spec
from e2epath.models.weights import build_encoder, weights_record
from e2epath.preprocess import shards
from e2epath.preprocess.store import LmdbReader

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


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def extract(encoder: nn.Module, store: LmdbReader, input_size: int, batch_size: int,
            dev: torch.device, workers: int) -> Tensor:
    """float16 [N, out_dim] features of every patch of ``store``, in store order; inputs resized
    and normalised as ``encoder.spec`` says, autocast to its dtype on CUDA."""
    encoder.eval()
    cuda = dev.type == "cuda"
    spec = encoder.spec
    dtype = AUTOCAST.get(spec["dtype"]) if cuda else None
    if cuda:  # the same algorithms every run: same input → same features
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    layout = torch.channels_last if cuda else torch.contiguous_format
    feats = []
    batches = PatchBatches(store, batch_size, workers)
    for batch in tqdm(batches, desc=store.meta["slide_id"], total=len(batches)):
        if cuda:  # uint8 travels: 4x less host → device traffic than float
            batch = batch.pin_memory()
        x = model_inputs(batch.to(dev, non_blocking=True), input_size, "whole", spec["mean"], spec["std"])
        x = x.contiguous(memory_format=layout)
        with torch.autocast(dev.type, dtype=dtype or torch.float16, enabled=dtype is not None):
            feats.append(encoder(x).half().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, encoder.out_dim, dtype=torch.float16)


def build_frozen_encoder(spec: dict, weights: str | None, seed: int, dev: torch.device) -> nn.Module:
    """Eval-mode encoder without gradients; random init seeded (`seeds.encoder`), so every slide's job
    builds the same one and features of different slides are comparable."""
    encoder = build_encoder(spec, weights, seed=seeds.encoder(seed)).to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


OUTPUTS: shards.Outputs = {"out": ("feature_dir", ".pt")}  # the .pt record (per shard: a folder of them)


@dataclass(frozen=True)
class FeatureParams:
    """How features are extracted (the `twostage` section and the encoder's preset)."""

    encoder: dict             # the preset (e2epath.presets), as the config changes it
    magnification: int
    weights: str | None       # None = random init; see models.build_encoder
    input_size: int           # the preset's, unless --input-size says otherwise
    batch_size: int
    seed: int
    workers: int              # decoding threads (0: decode inline); speed only
    pretrained: tuple[Path, ...] = ()  # the imagenet_weights record or the weights file

    def fingerprint(self) -> dict:
        """What the features depend on (not `workers`), a weights file by its stamp."""
        out = {k: v for k, v in asdict(self).items() if k not in ("workers", "pretrained")}
        if self.pretrained:
            out["weights"] = shards.file_stamp(self.pretrained[0])
        return out


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--encoder", required=True,
                    help=f"a preset ({', '.join(PRESETS)}) or a preset as JSON (what the workflow passes)")
    ap.add_argument("--magnification", type=int, required=True, choices=MAGNIFICATIONS)
    ap.add_argument("--weights", default=None,
                    help="imagenet | hf:<org>/<repo>/<file> | a state-dict file; left out: random initialisation")
    ap.add_argument("--input-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True, help="decoding threads (0: decode inline)")
    ap.add_argument("--pretrained", nargs="*", default=[], type=Path,
                    help="the encoder_weights record or the weights file (none for random init)")
    return ap


def _params(a: argparse.Namespace, ap: argparse.ArgumentParser) -> FeatureParams:
    try:
        spec = json.loads(a.encoder) if a.encoder.lstrip().startswith("{") else encoder_spec(a.encoder)
    except (EncoderError, json.JSONDecodeError) as err:
        ap.error(f"--encoder: {err}")
    input_size = a.input_size or spec["input_size"]
    spec = {**spec, "input_size": input_size}
    return FeatureParams(spec, a.magnification, a.weights, input_size, a.batch_size, a.seed, a.workers,
                         tuple(a.pretrained))


class Extractor:
    """Features of one slide at a time from its manifest rows; the encoder is built at first use."""

    def __init__(self, params: FeatureParams) -> None:
        self.params = params
        self.dev = torch_device()
        self.encoder: nn.Module | None = None
        self.weights: dict | None = None

    def __call__(self, slide: str, rows: list[dict], out: str | Path) -> dict:
        """Write ``out`` (the .pt record) and return its status: ok, skipped or failed."""
        p = self.params
        row, message = choose_row(rows, p.magnification)
        if message:
            logger.warning("slide %s: %s", slide, message)
        if row is None:
            rec = record(slide, "skipped", message)
        else:
            if self.encoder is None:
                self.encoder = build_frozen_encoder(p.encoder, p.weights, p.seed, self.dev)
                self.weights = weights_record(p.weights, list(p.pretrained))
                logger.info("encoder %s (%s): %d-d embeddings (%s) of %d px inputs; weights %s", p.encoder["name"],
                            p.encoder["arch"], p.encoder["dim"], p.encoder["embedding"], p.input_size,
                            self.weights.get("path") or "random init")
                if p.encoder["magnification"] != p.magnification:
                    logger.warning("encoder %s was trained at %dx; its features here are of %dx patches "
                                   "(twostage.magnification)", p.encoder["name"], p.encoder["magnification"],
                                   p.magnification)
            store = LmdbReader(row["lmdb"])
            mag = int(float(row["magnification"]))
            try:
                feats = extract(self.encoder, store, p.input_size, p.batch_size, self.dev, p.workers)
                rec = record(slide, "ok", message, mag, feats, store.coords)
                logger.info("slide %s: %d patches at %dx → features %s", slide, len(feats), mag, tuple(feats.shape))
            except (ValueError, KeyError) as err:  # a damaged store is this slide's problem, not the run's
                logger.error("slide %s: %s", slide, err)
                rec = record(slide, "failed", str(err), mag)
        rec["encoder_weights"] = self.weights
        rec["encoder"] = p.encoder["name"]
        write_features(out, rec)
        return {"slide_id": slide, "status": rec["status"], "message": rec["message"], "path": str(out)}


def _main(argv: list[str] | None, shard: bool) -> int:
    ap = _parser("e2epath extract_features" + ("_shard" if shard else ""))
    ap.add_argument("--rows", nargs="+", required=True, type=Path,
                    help="manifest rows (one slide) or patch tables (one shard): the configured magnification "
                         "and the coarser ones it may fall back to")
    shards.add_outputs(ap, shard, OUTPUTS)
    a = ap.parse_args(argv)
    params = _params(a, ap)
    rows: dict[str, list[dict]] = {}
    for row in read_records(a.rows):
        rows.setdefault(row["slide_id"], []).append(row)
    if not shard and len(rows) != 1:
        ap.error(f"--rows must all belong to one slide, got {sorted(rows)}")
    extractor = Extractor(params)
    items = []
    for slide, slide_rows in rows.items():
        out = shards.output_paths(a, shard, OUTPUTS, slide)["out"]
        upstream = sorted(r.get("fingerprint", "") for r in slide_rows)
        payload = {"step": "features", **params.fingerprint(), "rows": upstream}
        items.append(shards.Item(slide, payload, [out], functools.partial(extractor, slide, slide_rows, out)))
    return shards.execute("features", items, a, shard)


def cli(argv: list[str] | None = None) -> int:
    """Features of one slide from its manifest rows."""
    return _main(argv, shard=False)


def cli_shard(argv: list[str] | None = None) -> int:
    """Features of the slides of one shard (e2epath.shards); records carry the .pt path."""
    return _main(argv, shard=True)
