"""The feature files of the two-stage baseline (docs/contracts.md "Features"): one ``.pt`` per slide
and encoder, written by `extraction` and read by two-stage training and cohort prediction.

Content: ``slide_id``, ``status`` (ok | skipped | failed), ``message``, ``magnification``,
``features`` float16 [N, D], ``coords`` int32 [N, 2] (level-0 x, y of each patch, the store's order),
``encoder`` (its name) and ``encoder_weights`` (weights, path, sha256 of the checkpoint).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from e2epath.core.io import atomic_path, read_records

logger = logging.getLogger(__name__)


def record(slide: str, status: str, message: str, magnification: int | None = None,
           features: Tensor | None = None, coords: np.ndarray | None = None) -> dict:
    """The .pt content (docs/contracts.md "Features")."""
    return {"slide_id": slide, "status": status, "message": message, "magnification": magnification,
            "features": features if features is not None else torch.zeros(0, 0, dtype=torch.float16),
            "coords": torch.from_numpy(np.ascontiguousarray(coords, np.int32)) if coords is not None
            else torch.zeros(0, 2, dtype=torch.int32)}


def write_features(path: str | Path, rec: dict) -> None:
    """Write a feature record atomically."""
    with atomic_path(path) as tmp:
        torch.save(rec, tmp)


def read_features(path: str | Path) -> dict:
    """A feature record; an error naming the file when it is not one."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file, whatever torch says
        raise ValueError(f"{path}: not a readable feature file ({type(err).__name__}: {err}); rerun its "
                         "extract_features job") from err
    if not isinstance(rec, dict) or not {"slide_id", "status", "features", "coords"} <= set(rec):
        raise ValueError(f"{path}: not an e2epath feature file; rerun its extract_features job")
    return rec


@dataclass
class FeatureBag:
    """One unit of prediction — a slide, or a case with all its slides (slide-id order) — as frozen
    features: the two-stage counterpart of `e2epath.data.bags.Bag`."""

    unit_id: str
    case_id: str
    features: Tensor                              # float32 [N, D], the slides' patches in order
    parts: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (slide, level-0 coords [n, 2])

    def __len__(self) -> int:
        return len(self.features)


def load_feature_bags(slides_tsv: str | Path, paths: list[str | Path], cases: set[str], unit: str
                      ) -> tuple[dict[str, FeatureBag], dict[str, dict]]:
    """The feature bags of ``cases`` from the per-slide feature files, or from shard tables (JSON)
    listing them — one per case or per slide (``unit``) — and the encoders the files were made with
    (sha256 → name and weights: features of one bag set must come from one checkpoint). Slides
    whose features are not ok are skipped, logged."""
    case_of = pd.read_csv(slides_tsv, sep="\t", dtype=str).set_index("slide_id")["case_id"].to_dict()
    files = [p for p in paths if not str(p).endswith(".json")]
    files += [r["path"] for r in read_records(p for p in paths if str(p).endswith(".json"))]
    parts: dict[str, list] = {}
    units: dict[str, str] = {}
    encoders: dict[str, dict] = {}
    for path in sorted(files, key=lambda p: Path(p).name):
        rec = read_features(path)
        if rec.get("encoder_weights") is not None:
            weights = {"name": rec.get("encoder"), **rec["encoder_weights"]}
            encoders.setdefault(weights.get("sha256"), weights)
        case = case_of.get(rec["slide_id"])
        if case not in cases:
            continue
        if rec["status"] != "ok" or len(rec["features"]) == 0:
            logger.info("skip slide %s: %s", rec["slide_id"], rec.get("message") or rec["status"])
            continue
        bag = case if unit == "case" else rec["slide_id"]
        units[bag] = case
        parts.setdefault(bag, []).append((rec["slide_id"], rec["features"].float(), rec["coords"].numpy()))
    bags = {b: FeatureBag(b, units[b], torch.cat([f for _, f, _ in p]), [(s, xy) for s, _, xy in p])
            for b, p in parts.items()}
    return bags, encoders
