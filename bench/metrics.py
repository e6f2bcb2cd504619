"""Benchmark: 1000× bootstrap of the C-index and the AUC on n = 1000 cases — the vectorised
multiplicity-matrix code (`e2epath.core.metrics`, resampled by `e2epath.evaluate.bootstrap`)
against looping lifelines / scikit-learn over the same resample indices. Prints the times, the
speed-up and the largest difference per resample.

    PYTHONPATH=workflow python bench/metrics.py [--n 1000] [--n-boot 1000]
    PYTHONPATH=workflow python bench/metrics.py --quick    # n = 200, 50 resamples: a smoke test
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from e2epath.core import schema
from e2epath.core.predictions import prepare
from e2epath.evaluate import bootstrap as bs


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _report(name: str, point: float, ref_point: float, fast: np.ndarray, t_fast: float,
            slow: np.ndarray, t_slow: float) -> None:
    print(f"{name}: point ours {point:.12f} vs reference {ref_point:.12f} "
          f"(identical: {np.isclose(point, ref_point, rtol=0, atol=1e-12)})")
    print(f"  {fast.size} resamples: vectorised {t_fast:.3f} s, reference loop {t_slow:.3f} s, "
          f"speed-up {t_slow / t_fast:.1f}x, max |difference| {np.nanmax(np.abs(fast - slow)):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="n = 200, 50 resamples: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_boot = 200, 50
    rng = np.random.default_rng(args.seed)
    ids = [f"case{i:05d}" for i in range(args.n)]

    surv = prepare("survival", pd.DataFrame({
        "case_id": ids, "time": rng.integers(1, 120, args.n), "event": rng.integers(0, 2, args.n),
        "risk": rng.normal(size=args.n).round(2)}))
    idx = bs.resample_indices(surv.n, args.n_boot, args.seed)
    fast, t_fast = _timed(lambda: bs.resampled_metrics(surv, idx)["c_index"])
    slow, t_slow = _timed(lambda: np.array(
        [concordance_index(surv.time[r], -surv.risk[r], surv.event[r]) for r in idx]))
    _report("C-index", surv.point()["c_index"], concordance_index(surv.time, -surv.risk, surv.event),
            fast, t_fast, slow, t_slow)

    y = rng.integers(0, 2, args.n)
    p1 = np.clip(0.3 * y + rng.uniform(size=args.n), 0, 1).round(2)
    cls = prepare("classification", pd.DataFrame({
        "case_id": ids, "label": np.where(y == 1, "pos", "neg"), "prob_neg": 1 - p1, "prob_pos": p1}))
    yb = cls.y == 1
    fast, t_fast = _timed(lambda: bs.resampled_metrics(cls, idx)["auc"])
    slow, t_slow = _timed(lambda: np.array([roc_auc_score(yb[r], cls.prob[r, 1]) for r in idx]))
    _report("AUC", cls.point()["auc"], roc_auc_score(yb, cls.prob[:, 1]), fast, t_fast, slow, t_slow)

    alpha = schema.default("evaluate", "alpha")
    _, t_all = _timed(lambda: bs.bootstrap(cls, args.n_boot, args.seed, alpha))
    print(f"all 4 classification metrics, {args.n_boot} resamples incl. the draw: {t_all:.3f} s")


if __name__ == "__main__":
    main()
