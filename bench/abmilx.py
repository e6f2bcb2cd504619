"""Benchmark ABMILX against ABMIL and against the published one-call attention plus.

    .venv/bin/python bench/abmilx.py                 # full run (several minutes on 2 cores)
    .venv/bin/python bench/abmilx.py --sizes 512 10000 --skip-train
    .venv/bin/python bench/abmilx.py --quick         # N = 256, one train pair on 16 patches of 32 px: a smoke test

Each measurement runs in a fresh subprocess (2 torch threads, CPU) so that its peak memory is
its own: extra memory = max RSS after the measurement − max RSS before it (model and input
already allocated). Forward passes are eval / no_grad with in_dim 1024, inner 256, 8 heads.
"naive" is ABMILX with the published attention plus: one `scaled_dot_product_attention` call
with a one-wide value, which materialises N × N scores (skipped at 10^5: it would ask for
≈ 320 GB). The E2E training step is ResNet-18 (random init) + aggregator, forward + backward +
AdamW step on one bag of 512 patches, 64 × 64 by default on CPU (224 × 224 is too slow on 2
cores); ABMIL and ABMILX steps alternate in one process and the median of the paired ratios is
reported. Results are ratios measured in the same run; on a shared machine treat them as rough.
A measurement that fails is shown as "error" (its traceback on stderr) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

IN_DIM, INNER, HEADS, THREADS = 1024, 256, 8, 2
GOALS = ("goals: N=10^4 ≤ 1.5 s and ≤ 0.5 GB extra; N=10^5 completes with ≤ 3 GB extra; "
         "train step ratio ≤ 1.05")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def naive_propagate(q, k, value, mask=None, chunk_size=0):
    """The published attention plus: one SDPA call with a one-wide value (math kernel, N × N)."""
    import torch.nn.functional as F
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, value.unsqueeze(-1).to(q.dtype), attn_mask=attn_mask)[..., 0]


def build(name: str, in_dim: int = IN_DIM):
    """ABMILX / ABMIL with the benchmark's sizes; "naive" is ABMILX with the published product."""
    import torch

    from e2epath.models import abmilx
    from e2epath.models.aggregators import build_aggregator
    torch.manual_seed(0)
    if name == "naive":
        abmilx.propagate_attention = naive_propagate
        name = "abmilx"
    kw = {"inner_dim": INNER, "n_heads": HEADS} if name == "abmilx" else {"inner_dim": INNER}
    return build_aggregator(name, in_dim, 2, **kw)


def forward_worker(model_name: str, n: int) -> dict:
    import torch
    model = build(model_name).eval()
    x = torch.randn(1, n, IN_DIM, generator=torch.Generator().manual_seed(0))
    repeats = 5 if n <= 1000 else 2 if n <= 20000 else 1
    with torch.no_grad():
        model(x[:, :64])  # first-call initialisation outside the measurement
        before = max_rss_mb()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return {"seconds": min(times), "extra_mb": max_rss_mb() - before}


def train_worker(patches: int, size: int, pairs: int = 3) -> dict:
    """Alternate ABMIL and ABMILX steps in one process: paired ratios cancel most machine noise."""
    import copy

    import torch

    from e2epath.models.weights import build_encoder
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", None).train()  # BatchNorm in train mode, as in E2E training
    images = torch.randn(patches, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1])
    setups = {}
    for name in ("abmil", "abmilx"):
        enc, agg = copy.deepcopy(encoder), build(name, encoder.out_dim).train()
        setups[name] = (enc, agg, torch.optim.AdamW([*enc.parameters(), *agg.parameters()], lr=1e-5))

    def step(name: str) -> float:
        enc, agg, optimizer = setups[name]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(agg(enc(images).unsqueeze(0)), target).backward()
        optimizer.step()
        return time.perf_counter() - start

    for name in setups:  # warm-up (allocations, optimizer state)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(pairs):
        for name in (("abmil", "abmilx") if i % 2 == 0 else ("abmilx", "abmil")):
            times[name].append(step(name))
    ratios = [x / b for x, b in zip(times["abmilx"], times["abmil"])]
    # The aggregators alone (forward + backward on fixed features): their difference is all that
    # ABMILX adds to a step, measured far more precisely than two noisy whole steps.
    features = torch.randn(1, patches, encoder.out_dim, generator=torch.Generator().manual_seed(1))
    features.requires_grad_(True)
    alone: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(10):
        for name, (_, agg, _) in setups.items():
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(agg(features), target).backward()
            alone[name].append(time.perf_counter() - start)
    extra = min(alone["abmilx"]) - min(alone["abmil"])
    # Background load only ever adds time, so the ratio of the fastest steps is the robust one.
    return {"abmil_s": min(times["abmil"]), "abmilx_s": min(times["abmilx"]),
            "abmil_alone_s": min(alone["abmil"]), "abmilx_alone_s": min(alone["abmilx"]),
            "ratio_implied": (min(times["abmil"]) + extra) / min(times["abmil"]),
            "ratio_min": min(times["abmilx"]) / min(times["abmil"]),
            "ratio_median_pairs": statistics.median(ratios), "ratios": ratios}


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr, flush=True)
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(result: dict | None, key: str, spec: str) -> str:
    if result is None:
        return "—"
    return "error" if "error" in result else format(result[key], spec)


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "—"
    return f"{a['seconds'] / b['seconds']:.2f}"


def failed(results: list[dict | None]) -> int:
    """How many of the measurements ended in an error."""
    return sum(1 for r in results if r and "error" in r)


def forward_table(sizes: list[int]) -> tuple[list[str], int]:
    """The forward table's Markdown rows, and how many measurements failed."""
    errors = 0
    rows = ["| N | ABMILX s | ABMILX extra MB | ABMIL s | ABMIL extra MB | naive s | naive extra MB "
            "| ABMILX / ABMIL | naive / ABMILX |", "|---" * 9 + "|"]
    for n in sizes:
        res = {m: run_worker({"kind": "forward", "model": m, "n": n}) for m in ("abmilx", "abmil")}
        res["naive"] = run_worker({"kind": "forward", "model": "naive", "n": n}) if n <= 20000 else None
        for m, r in res.items():
            print(f"  forward {m:6s} N={n}: {r}", file=sys.stderr, flush=True)
        cells = [fmt(res[m], key, spec) for m in ("abmilx", "abmil", "naive")
                 for key, spec in (("seconds", ".3f"), ("extra_mb", ".0f"))]
        cells += [ratio(res["abmilx"], res["abmil"]), ratio(res["naive"], res["abmilx"])]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
        errors += failed(list(res.values()))
    return rows, errors


def train_table(patches: int, size: int, pairs: int) -> tuple[list[str], int]:
    """The train-step table's lines, and how many measurements failed (0 or 1)."""
    res = run_worker({"kind": "train", "patches": patches, "size": size, "pairs": pairs})
    print(f"  train: {res}", file=sys.stderr, flush=True)
    head = (f"E2E train step (forward + backward + AdamW), ResNet-18 random init, one bag of {patches} "
            f"patches of {size}×{size}, CPU {THREADS} threads, {pairs} alternating pairs after warm-up:")
    if "error" in res:
        return [head, "", f"error: {res['error']}"], 1
    return [head, "", "| ABMIL step s | ABMILX step s | ratio (best steps) | ratio (median of pairs) "
            "| ABMIL alone s | ABMILX alone s | ratio implied |", "|---|---|---|---|---|---|---|",
            f"| {res['abmil_s']:.2f} | {res['abmilx_s']:.2f} | {res['ratio_min']:.3f} "
            f"| {res['ratio_median_pairs']:.3f} | {res['abmil_alone_s']:.4f} | {res['abmilx_alone_s']:.4f} "
            f"| {res['ratio_implied']:.3f} |", "",
            "step s: best of the alternating steps; alone: the aggregator's forward + backward on fixed "
            "features (best of 10); ratio implied = (ABMIL step + ABMILX alone − ABMIL alone) / "
            "ABMIL step."], 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 10_000, 100_000],
                        help="bag sizes for the forward table (none: skip it)")
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5, help="alternating ABMIL/ABMILX train steps")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="N = 256 and one train pair on 16 patches of 32 px: a smoke test")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.patches, args.patch_size, args.pairs = [256], 16, 32, 1
    if args.worker:
        import torch
        torch.set_num_threads(THREADS)
        spec = json.loads(args.worker)
        if spec["kind"] == "forward":
            result = forward_worker(spec["model"], spec["n"])
        else:
            result = train_worker(spec["patches"], spec["size"], spec["pairs"])
        print(json.dumps(result))
        return 0
    lines, errors = [], 0
    if args.sizes:
        rows, errors = forward_table(args.sizes)
        lines += [f"Forward, eval/no_grad, CPU {THREADS} threads, in_dim {IN_DIM}, inner {INNER}, "
                  f"{HEADS} heads (time: best of repeats):", "", *rows]
    if not args.skip_train:
        train, train_errors = train_table(args.patches, args.patch_size, args.pairs)
        lines += ["", *train]
        errors += train_errors
    print("\n".join(lines + ["", GOALS]), flush=True)
    if errors:
        print(f"{errors} measurement(s) failed", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
