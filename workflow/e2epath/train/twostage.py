"""Two-stage MIL: an aggregator trained on frozen features of full bags (batch size 1).

Same splits, loop, tasks, model selection and outputs as E2E; only the inputs differ.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import read_records
from ..models import build_aggregator
from .fold import (
    bag_outputs,
    finish_checkpoint,
    keep_cases,
    load_fold,
    make_task,
    parser,
    prepare_checkpoint,
)
from .loop import device, fit, write_outputs

logger = logging.getLogger(__name__)


def load_feature_bags(slides_tsv: str, paths: list[str], cases: set[str]) -> dict[str, tuple[torch.Tensor, list]]:
    """case → (features [N, D] float32, [(slide, coords)]) from the per-slide feature files, or
    from shard tables (JSON) listing them; a case's slides in slide-id order."""
    case_of = pd.read_csv(slides_tsv, sep="\t", dtype=str).set_index("slide_id")["case_id"].to_dict()
    files = [p for p in paths if not str(p).endswith(".json")]
    files += [r["path"] for r in read_records(p for p in paths if str(p).endswith(".json"))]
    parts: dict[str, list] = {}
    for path in sorted(files, key=lambda p: Path(p).name):
        rec = torch.load(path, map_location="cpu", weights_only=True)
        case = case_of.get(rec["slide_id"])
        if case not in cases:
            continue
        if rec["status"] != "ok" or len(rec["features"]) == 0:
            logger.info("skip slide %s: %s", rec["slide_id"], rec.get("message") or rec["status"])
            continue
        parts.setdefault(case, []).append((rec["slide_id"], rec["features"].float(), rec["coords"].numpy()))
    return {c: (torch.cat([f for _, f, _ in p]), [(s, xy) for s, _, xy in p]) for c, p in parts.items()}


def cli(argv: list[str] | None = None) -> int:
    ap = parser("e2epath train_mil")
    ap.add_argument("--features", nargs="+", required=True)
    args = ap.parse_args(argv)
    fold = load_fold(args)
    spec, dev = fold.spec, device()
    bags = load_feature_bags(args.slides, args.features, {c for ids in fold.cases.values() for c in ids})
    keep_cases(fold, set(bags))
    task = make_task(fold)
    in_dim = next(iter(bags.values()))[0].shape[1]
    torch.manual_seed(args.seed * 1000 + args.fold)
    model = build_aggregator(spec["aggregator"], in_dim, task.n_outputs, **spec["aggregator_kw"]).to(dev)
    train = fold.cases["train"]
    strata = task.strata(train)
    oversample = spec["oversample"] and spec["task_type"] != "survival"

    def batches(epoch: int):
        from ..data import balanced_order

        for i in balanced_order(strata, np.random.default_rng([args.seed, args.fold, epoch]), oversample):
            case = train[i]
            yield bags[case][0][None].to(dev), task.target(case)[None]

    @torch.no_grad()
    def predict(case_ids: list[str]):
        model.eval()
        logits, attention = [], []
        for case in case_ids:
            out, attn = model(bags[case][0][None].to(dev), return_attention=True)
            logits.append(out.float())
            attention.append((attn[0], bags[case][1]))
        return bag_outputs(task, case_ids, logits, attention)

    prepare_checkpoint(fold.checkpoint, spec)
    mean_n = int(np.mean([len(bags[c][0]) for c in train]))
    result = fit(model, task, batches, predict, fold.cases["val"], spec, fold.checkpoint, mean_n)
    write_outputs(result, model, predict, fold.cases["test"], spec, fold.outputs,
                  extra={"classes": getattr(task, "classes", None), "in_dim": in_dim})
    finish_checkpoint(fold.checkpoint)
    return 0
