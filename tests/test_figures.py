"""Figures: every figure is written from realistic fixture files (docs/contracts.md formats, real
pyramidal TIFF slides read through OpenSlide); heatmap placement, KM log-rank p and ROC AUC are
checked against independent computations."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from sklearn.metrics import roc_auc_score

from e2epath.core.layout import Run
from e2epath.figures import cli_qc, cli_task, heatmaps, roc, survival
from e2epath.sources.slidewriter import write_generic_tiff
from e2epath.train import attention
from helpers import write_run

METHODS = [("e2e", "r18_abmilx"), ("e2e", "r18_abmil"), ("twostage", "ts_abmil")]
FOLDS = (0, 1)
SLIDE_WH = (1024, 768)  # level-0 px
PATCH = 64  # level-0 px per patch
N_CASES = 16  # per fold


def _slide_rgb(seed: int) -> np.ndarray:
    w, h = SLIDE_WH
    rgb = np.full((h, w, 3), 235, np.uint8)  # background
    rng = np.random.default_rng(seed)
    cv2.ellipse(rgb, (w // 2, h // 2), (w // 3, h // 3), 0, 0, 360, (180, 90, 160), -1)  # tissue
    noise = rng.integers(-20, 20, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)


def _case_ids(fold: int) -> list[str]:
    return [f"case{fold}_{i:02d}" for i in range(N_CASES)]


def _attention(rng, slide_hot: dict[str, int]) -> dict[str, np.ndarray]:
    """Attention over a grid of patches; the patch of index slide_hot[slide] gets the most."""
    gx, gy = np.meshgrid(np.arange(2, 14) * PATCH, np.arange(2, 10) * PATCH)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int32)
    out = {"__magnification__": np.array(10)}
    for slide, hot in slide_hot.items():
        logits = rng.normal(0, 0.3, (4, len(coords)))
        logits[:, hot] += 6.0
        att = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        out[slide] = att.astype(np.float32)
        out[f"{slide}__coords"] = coords
    return out


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    """Three real generic TIFF slides and their QC table (results/slides.tsv)."""
    root = tmp_path_factory.mktemp("slides")
    ids = ["S-a", "S-b", "S-c"]
    rows = []
    for i, s in enumerate(ids):
        path = write_generic_tiff(root / f"{s}.tif", _slide_rgb(i), mpp=0.5, downsamples=(1, 2, 4))
        rows.append({"slide_id": s, "case_id": s, "path": str(path.resolve()), "status": "ok",
                     "vendor": "generic-tiff", "width": SLIDE_WH[0], "height": SLIDE_WH[1], "level_count": 3,
                     "mpp": 0.5, "mpp_source": "openslide", "error": None})
    table = root / "slides.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    hot = {"S-a": 5, "S-b": 40, "S-c": 90}
    return {"table": table, "ids": ids, "hot": hot, "paths": {r["slide_id"]: Path(r["path"]) for r in rows}}


def _history(rng) -> pd.DataFrame:
    epochs = np.arange(6)
    return pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / (1 + epochs) + rng.uniform(0, 0.05, 6),
                         "val_metric": 0.5 + 0.05 * epochs + rng.uniform(0, 0.02, 6), "lr": 1e-4,
                         "seconds": 2.0, "patches_per_s": 100.0})


def _classification_pred(fold: int, rng, strength: float) -> pd.DataFrame:
    y = np.array([i % 2 for i in range(N_CASES)])
    p = 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(0, 2, N_CASES))))
    return pd.DataFrame({"case_id": _case_ids(fold), "label": np.where(y == 1, "tumor", "normal"),
                         "prob_normal": 1 - p, "prob_tumor": p})


def _survival_pred(fold: int, rng, strength: float) -> pd.DataFrame:
    risk = rng.normal(0, 1, N_CASES)
    time = rng.exponential(np.exp(-strength * risk) * 24) + 0.5
    return pd.DataFrame({"case_id": _case_ids(fold), "time": np.round(time, 2),
                         "event": (rng.uniform(size=N_CASES) < 0.7).astype(int), "risk": risk})


def _metrics(runs: dict, task_type: str) -> pd.DataFrame:
    """A metrics table like evaluate's, point estimates from scikit-learn / a simple formula."""
    rows = []
    for (family, method), folds in runs.items():
        for fold in [*FOLDS, "pooled"]:
            dfs = [pd.read_csv(folds[k].path("predictions"), sep="\t") for k in (FOLDS if fold == "pooled" else [fold])]
            df = pd.concat(dfs)
            if task_type == "survival":
                names = {"c_index": 0.6 + 0.05 * (len(method) % 3)}
            else:
                auc = roc_auc_score(df["label"] == "tumor", df["prob_tumor"])
                names = {"auc": auc, "accuracy": ((df["prob_tumor"] > .5) == (df["label"] == "tumor")).mean()}
            for metric, v in names.items():
                rows.append({"cohort": "internal", "method": method, "family": family, "unit": "case", "fold": fold,
                             "metric": metric, "sd": np.nan,
                             "point": v,
                             "mean": v - 0.005, "ci_low": v - 0.1, "ci_high": min(1.0, v + 0.08), "n": len(df)})
    return pd.DataFrame(rows)


def _task_fixture(root: Path, task: str, task_type: str, slides: dict | None) -> dict:
    """Runs of three methods × two folds (attention in fold 0 when ``slides``), and their metrics table."""
    rng = np.random.default_rng(7)
    runs: dict[tuple[str, str], dict[int, Run]] = {}
    for j, (family, method) in enumerate(METHODS):
        runs[(family, method)] = {}
        for fold in FOLDS:
            pred = (_classification_pred(fold, rng, 0.5 + 0.5 * j) if task_type != "survival"
                    else _survival_pred(fold, rng, 1.0 + j))
            attention = _attention(rng, slides["hot"]) if slides is not None and fold == 0 else None
            runs[(family, method)][fold] = write_run(root, family, task, task_type, method, fold, pred,
                                                     _history(rng), attention)
    metrics = root / "results" / "metrics" / f"{task}.tsv"
    metrics.parent.mkdir(parents=True)
    _metrics(runs, task_type).to_csv(metrics, sep="\t", index=False)
    all_runs = [r for folds in runs.values() for r in folds.values()]
    return {"runs": runs, "all": all_runs, "metrics": metrics, "out": root / "results" / "figures" / task}


def _argv(fx: dict, task: str, task_type: str, slides: dict) -> list[str]:
    return ["--task", task, "--task-type", task_type, "--metrics", str(fx["metrics"]), "--slides",
            str(slides["table"]), "--out-dir", str(fx["out"]), "--seed", "0", "--alpha", "0.05", "--n-boot", "50",
            "--runs", *[str(r.path("run")) for r in fx["all"]]]


def _check_png(path: Path, aspect: float | None = None) -> np.ndarray:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std(0).max() > 0.05, f"{path} is (nearly) a single colour"
    assert len(np.unique((flat * 255).astype(np.uint8), axis=0)) > 20, f"{path} has too few colours"
    if aspect is not None:
        assert img.shape[1] / img.shape[0] == pytest.approx(aspect, rel=0.02), path
    return img


def _check_pdf(path: Path) -> None:
    assert path.read_bytes()[:5] == b"%PDF-" and path.stat().st_size > 1000, path


def test_classification_figures(tmp_path, slides):
    fx = _task_fixture(tmp_path, "subtype", "classification", slides)
    assert cli_task(_argv(fx, "subtype", "classification", slides)) == 0
    out = fx["out"]
    for name in ("roc", "forest", "curves", "attention"):
        _check_pdf(out / f"{name}.pdf")
    _check_png(out / "roc.png", aspect=1.0)  # square ROC
    _check_png(out / "curves.png", aspect=10 / 4)  # two panels side by side
    _check_png(out / "forest.png")
    img = _check_png(out / "attention.png")
    assert 1.1 < img.shape[1] / img.shape[0] < 1.6, "3 slides × 3 methods of 4:3 thumbnails: about 4:3"
    assert not (out / "km.png").exists()
    status = pd.read_csv(out / "figures.tsv", sep="\t")
    assert set(status[status["status"] == "written"]["figure"]) == {"roc", "forest", "curves", "attention"}
    assert not list(out.parent.glob(".*tmp*")), "temporary folder left behind"


def test_survival_figures(tmp_path, slides):
    fx = _task_fixture(tmp_path, "os", "survival", slides)
    assert cli_task(_argv(fx, "os", "survival", slides)) == 0
    out = fx["out"]
    for name in ("km", "forest", "curves", "attention"):
        _check_pdf(out / f"{name}.pdf")
    _check_png(out / "km.png", aspect=len(METHODS))  # one square panel per method
    _check_png(out / "forest.png")
    _check_png(out / "curves.png", aspect=10 / 4)
    _check_png(out / "attention.png")
    assert not (out / "roc.png").exists()


def test_missing_attention_and_rerun_replaces_folder(tmp_path, slides):
    fx = _task_fixture(tmp_path, "subtype", "classification", slides)
    assert cli_task(_argv(fx, "subtype", "classification", slides) + ["--n-attention", "1"]) == 0
    assert (fx["out"] / "attention.png").exists()
    for run in fx["all"]:
        run.path("attention").unlink(missing_ok=True)
    assert cli_task(_argv(fx, "subtype", "classification", slides)) == 0
    out = fx["out"]
    assert not (out / "attention.png").exists(), "a stale figure survived the rerun"
    for name in ("roc", "forest", "curves"):
        _check_png(out / f"{name}.png")
    status = pd.read_csv(out / "figures.tsv", sep="\t").set_index("figure")
    assert status.loc["attention", "status"] == "skipped"


def test_single_class_test_folds_skip_roc_only(tmp_path, slides):
    fx = _task_fixture(tmp_path, "subtype", "classification", None)
    for run in fx["all"]:
        df = pd.read_csv(run.path("predictions"), sep="\t")
        df.assign(label="tumor").to_csv(run.path("predictions"), sep="\t", index=False)
    assert cli_task(_argv(fx, "subtype", "classification", slides)) == 0
    out = fx["out"]
    assert not (out / "roc.png").exists()
    _check_png(out / "forest.png")
    _check_png(out / "curves.png")
    status = pd.read_csv(out / "figures.tsv", sep="\t").set_index("figure")
    assert status.loc["roc", "status"] == "skipped" and "single class" in status.loc["roc", "reason"]


def test_attention_raster_puts_max_on_the_hottest_patch(slides):
    rgb, ds = heatmaps.thumbnail(slides["paths"]["S-b"], max_px=300)  # a real thumbnail through OpenSlide
    assert rgb.shape[1] == 300 and ds[0] == pytest.approx(SLIDE_WH[0] / 300, rel=0.01)
    att = _attention(np.random.default_rng(1), {"S-b": 57})
    npz = {k: v for k, v in att.items()}
    coords = npz["S-b__coords"]
    assert heatmaps.infer_patch_size(coords) == PATCH
    scores = heatmaps.percentile(npz["S-b"].astype(float).mean(0))
    raster = heatmaps.attention_raster(coords, scores, PATCH, rgb.shape[:2], ds)
    y, x = np.unravel_index(np.nanargmax(raster), raster.shape)
    x0, y0 = coords[57]
    assert x0 <= (x + 0.5) * ds[0] <= x0 + PATCH and y0 <= (y + 0.5) * ds[1] <= y0 + PATCH
    # off the patch grid (background) nothing is drawn
    assert np.isnan(raster[0, 0]) and np.isnan(raster[-1, -1])
    assert np.nanmax(raster) == 1.0 and np.nanmin(raster) == 0.0


def test_percentile_scale_is_rank_based_with_shared_ties():
    got = heatmaps.percentile(np.array([5.0, 1e9, 1.0, 5.0, 3.0]))
    np.testing.assert_allclose(got, [2.5 / 4, 1.0, 0.0, 2.5 / 4, 1 / 4])  # an outlier does not squash the rest
    assert heatmaps.percentile(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]
    assert heatmaps.percentile(np.array([7.0])).tolist() == [0.5]


def test_unreadable_slide_is_left_out_of_the_attention_figure(tmp_path, slides):
    fx = _task_fixture(tmp_path, "subtype", "classification", slides)
    table = pd.read_csv(slides["table"], sep="\t")
    table.loc[table["slide_id"] == "S-b", "path"] = str(tmp_path / "gone.tif")
    with_attention = [r for r in fx["all"] if r.path("attention").is_file()]
    fig = heatmaps.plot_attention(with_attention, table, n_slides=3, seed=0)
    rows = {ax.get_ylabel() for ax in fig.axes[:-1] if ax.get_ylabel()}  # last: colour bar
    assert rows == {"S-a", "S-c"}
    assert len(fig.axes) == 2 * 3 + 1  # 2 slides × 3 methods + colour bar
    table.loc[table["slide_id"] == "S-c", "status"] = "failed"  # failed QC: not shown either
    fig = heatmaps.plot_attention(with_attention, table, n_slides=3, seed=0)
    assert {ax.get_ylabel() for ax in fig.axes[:-1] if ax.get_ylabel()} == {"S-a"}


def test_patch_size_is_the_grid_step_of_the_coords(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 512]], np.int32)
    np.savez(tmp_path / "a.npz", s1=np.ones((2, 3), np.float32), s1__coords=coords)
    with np.load(tmp_path / "a.npz") as z:
        assert attention.slide_ids(z) == ["s1"]
        assert heatmaps.read_slide(z, "s1", "a.npz").patch_l0 == 512


def test_km_logrank_matches_lifelines(tmp_path):
    fx = _task_fixture(tmp_path, "os", "survival", None)
    files = fx["runs"][("e2e", "r18_abmilx")]
    folds = {k: pd.read_csv(files[k].path("predictions"), sep="\t", dtype={"case_id": str}) for k in FOLDS}
    folds[1] = folds[1].iloc[1:]  # an odd fold: its median risk is a case's own risk
    split = survival.median_split(folds)
    # independent split: above each fold's own median risk
    high, low = [], []
    for k, df in folds.items():
        med = np.median(df["risk"])
        high.append(df[df["risk"] > med])
        low.append(df[df["risk"] <= med])
    high, low = pd.concat(high), pd.concat(low)
    assert sorted(split[split["high"]]["case_id"]) == sorted(high["case_id"])
    expected = logrank_test(high["time"], low["time"], high["event"], low["event"]).p_value
    assert survival.logrank_p(split) == pytest.approx(expected, rel=1e-12)


def test_roc_auc_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(0, 1, (90, 3)) + 1.5 * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    tpr, lo, hi, auc, ci = roc.roc_band(y, prob, n_boot=40, seed=0, alpha=0.05)
    assert auc == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert ci[0] < auc < ci[1]
    assert (lo <= tpr + 1e-9).mean() > 0.9 and (hi >= tpr - 1e-9).mean() > 0.9
    yb = (y == 0).astype(int)
    pb = np.stack([1 - prob[:, 0], prob[:, 0]], 1)
    _, auc_b = roc.macro_roc(yb, pb)
    assert auc_b == pytest.approx(roc_auc_score(yb, prob[:, 0]))
    # a 3-grade task through the figure, fold 1's model scoring on half the scale (x 0.5): the legend
    # carries the macro one-vs-rest AUC over pairs within a fold (each class: the folds' AUCs
    # weighted by positives x negatives), which the scale does not change
    prob[45:] *= 0.5
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(90)], "label": [str(g + 1) for g in y],
                       **{f"prob_{g + 1}": prob[:, g] for g in range(3)}})
    fig = roc.plot_roc({("e2e", "r18_abmilx"): {0: df.iloc[:45], 1: df.iloc[45:]}}, "grading", n_boot=20, seed=0, alpha=0.05)
    (text,) = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    per_class = []
    for g in range(3):
        parts = [(y[s] == g, prob[s, g]) for s in (slice(0, 45), slice(45, 90))]
        per_class.append(np.average([roc_auc_score(pos, p) for pos, p in parts],
                                    weights=[pos.sum() * (~pos).sum() for pos, _ in parts]))
    expected = float(np.mean(per_class))
    pooled = np.mean([roc_auc_score(y == g, prob[:, g]) for g in range(3)])
    assert f"{expected:.3f}" != f"{pooled:.3f}"  # pooling the folds would show
    assert f"AUC {expected:.3f}" in text


def test_cohort_figures(tmp_path):
    thumbs = tmp_path / "results" / "tissue" / "thumbs"
    thumbs.mkdir(parents=True)
    rows, man = [], []
    for i, s in enumerate(["S1", "S2", "S3", "S4"]):
        failed = s == "S3"
        rows.append({"slide_id": s, "case_id": s, "path": f"/data/{s}.svs", "status": "failed" if failed else "ok",
                     "vendor": "aperio" if i % 2 else "generic-tiff", "width": 1024, "height": 768,
                     "level_count": 3, "level_downsamples": "[1, 2, 4]", "level_dimensions": "[[1024, 768]]",
                     "mpp": None if failed else 0.5, "mpp_source": None if failed else ("openslide" if i else "tiff"),
                     "objective_power": None,
                     "error": "S3.svs: OpenSlide cannot open it: TIFFReadDirectory failed" if failed else None})
        for mag in (5, 10, 20):
            ok = not failed and not (s == "S4" and mag == 20)
            man.append({"slide_id": s, "magnification": mag,
                        "status": "ok" if ok else ("failed" if failed else "unavailable"),
                        "n_patches": (30 * (i + 1) * mag // 5) if ok else 0, "lmdb": f"results/lmdb/{mag}x/{s}.lmdb",
                        "mpp": 10 / mag, "read_level": 0, "read_downsample": 1.0, "message": ""})
        if not failed:
            cv2.imwrite(str(thumbs / f"{s}.png"), cv2.cvtColor(_slide_rgb(i)[::4, ::4], cv2.COLOR_RGB2BGR))
    pd.DataFrame(rows).to_csv(tmp_path / "slides.tsv", sep="\t", index=False)
    pd.DataFrame(man).to_csv(tmp_path / "manifest.tsv", sep="\t", index=False)
    out = tmp_path / "results" / "figures" / "qc"
    assert cli_qc(["--slides", str(tmp_path / "slides.tsv"), "--manifest", str(tmp_path / "manifest.tsv"),
                       "--thumbs", *map(str, sorted(thumbs.glob("*.png"))), "--out-dir", str(out)]) == 0
    _check_png(out / "qc_montage.png", aspect=1.0)  # 4 slides → 2 × 2 square tiles
    _check_png(out / "patch_counts.png")
    for name in ("qc_montage", "patch_counts"):
        _check_pdf(out / f"{name}.pdf")
    summary = pd.read_csv(out / "cohort.tsv", sep="\t").set_index(["category", "value"])["n_slides"]
    assert summary[("status", "ok")] == 3 and summary[("status", "failed")] == 1
    assert summary[("mpp_source", "openslide")] == 2 and summary[("mpp_source", "tiff")] == 1
    assert summary[("vendor", "aperio")] == 2
    assert summary[("patches_20x", "unavailable")] == 1 and summary[("patches_5x", "ok")] == 3


def test_a_run_without_its_identifiers_is_a_clear_error(tmp_path, slides, caplog):
    fx = _task_fixture(tmp_path, "subtype", "classification", None)
    broken = fx["all"][0].path("run")
    broken.write_text(json.dumps({"family": "e2e", "task": "subtype", "method": "r18_abmilx"}))
    with caplog.at_level(logging.ERROR):
        assert cli_task(_argv(fx, "subtype", "classification", slides)) == 2
    assert f"{broken}: run.json lacks task_type, fold" in caplog.text


def test_a_slide_map_of_a_hundred_thousand_patches_stays_small(tmp_path):
    """10^5 patches of a 100,000 px slide at 0.25 µm/px: the 8 µm/px map and the GeoJSON are made
    without a full-resolution raster or an in-memory feature list."""
    import json
    import tracemalloc

    n, side = 100_000, 256
    grid = np.stack(np.meshgrid(np.arange(316), np.arange(317)), -1).reshape(-1, 2)[:n] * side
    scores = np.random.default_rng(0).random(n)
    ds = 8.0 / 0.25  # level-0 px per map px
    shape = (int(100_000 / ds), int(100_000 / ds))
    tracemalloc.start()
    rgb = heatmaps.render_attention(np.full((*shape, 3), 230, np.uint8), (ds, ds), grid, scores, side,
                                    contours=[[[0, 0], [80_000, 0], [80_000, 80_000], [0, 0]]])
    heatmaps.write_geojson(tmp_path / "big.geojson", grid, side, {"attention mean": scores})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rgb.shape == (*shape, 3)
    assert peak < 400e6, peak  # a level-0 raster would be 30 GB
    geo = json.loads((tmp_path / "big.geojson").read_text())
    assert len(geo["features"]) == n
    assert geo["features"][-1]["properties"]["measurements"]["attention mean"] == pytest.approx(scores[-1])
