"""Evaluation: metrics equal scikit-learn / lifelines, the vectorised bootstrap equals a slow loop
over the same resamples, paired differences, the `evaluate` and `tables` command lines."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from e2epath.core import layout, predictions
from e2epath.core import metrics as m
from e2epath.core.layout import read_runs
from e2epath.evaluate import bootstrap as bs
from e2epath.evaluate import evaluation as ev
from e2epath.evaluate import tables
from helpers import write_run

TIGHT = dict(rtol=0, atol=1e-12)


def _cls_df(rng, n, classes, tie_step=0.1, signal=1.0):
    """Predictions with coarse (tied) probabilities; labels drawn so every class occurs."""
    k = len(classes)
    y = rng.permutation(np.resize(np.arange(k), n))
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p = np.round(p / tie_step) * tie_step + 1e-3  # ties on purpose
    p /= p.sum(1, keepdims=True)
    df = pd.DataFrame({"case_id": [f"case{i:04d}" for i in range(n)],
                       "label": [str(classes[j]) for j in y]})
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = p[:, j]
    return df


def _surv_df(rng, n):
    return pd.DataFrame({"case_id": [f"case{i:04d}" for i in range(n)],
                         "time": rng.integers(1, 15, n).astype(float),  # many tied times
                         "event": rng.integers(0, 2, n),
                         "risk": rng.integers(0, 8, n) / 4})  # tied risks


def _sk_classification(df, classes):
    """Reference metrics with scikit-learn on the DataFrame as written."""
    y = df["label"].astype(str).to_numpy()
    prob = df[[f"prob_{c}" for c in classes]].to_numpy()
    pred = np.array([str(c) for c in classes])[prob.argmax(1)]
    if len(classes) == 2:
        auc = roc_auc_score(y == str(classes[1]), prob[:, 1])
    else:
        auc = roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=[str(c) for c in classes])
    return {"auc": auc, "accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro")}, y, pred


def _fold_weighted_auc(parts, classes):
    """Pooled-folds AUC with scikit-learn: per class (one-vs-rest; binary: the second class), the
    folds' AUCs weighted by their positive × negative pair counts; macro mean over classes."""
    per_class = []
    for c in (classes[1:] if len(classes) == 2 else classes):
        aucs, pairs = [], []
        for df in parts:
            positive = df["label"].astype(str).to_numpy() == str(c)
            if 0 < positive.sum() < len(positive):
                aucs.append(roc_auc_score(positive, df[f"prob_{c}"]))
                pairs.append(positive.sum() * (~positive).sum())
        per_class.append(np.average(aucs, weights=pairs))
    return float(np.mean(per_class))


# --------------------------------------------------------------------------- point estimates

@pytest.mark.parametrize("seed", range(3))
def test_binary_and_multiclass_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    for classes in (["neg", "pos"], ["LUAD", "LUSC", "normal"]):
        df = _cls_df(rng, 97, classes)
        ours = predictions.task_metrics("classification", df)
        ref, y, pred = _sk_classification(df, classes)
        assert set(ours) == set(ref)
        for name in ref:
            assert np.isclose(ours[name], ref[name], **TIGHT), (classes, name, ours[name], ref[name])
    # plain-array API, 1-D binary scores with ties
    yb = rng.integers(0, 2, 80)
    s = rng.integers(0, 5, 80) / 5
    assert np.isclose(m.auc(yb, s), roc_auc_score(yb, s), **TIGHT)


@pytest.mark.parametrize("seed", range(3))
def test_grading_qwk_equals_sklearn_with_numeric_class_order(seed):
    rng = np.random.default_rng(seed)
    grades = [1, 2, 10]  # string order would put 10 before 2 and change the kappa weights
    df = _cls_df(rng, 120, grades, signal=1.5)
    ours = predictions.task_metrics("grading", df)
    y = df["label"].astype(int).to_numpy()
    pred = np.array(grades)[df[[f"prob_{g}" for g in grades]].to_numpy().argmax(1)]
    assert np.isclose(ours["qwk"], cohen_kappa_score(y, pred, labels=grades, weights="quadratic"), **TIGHT)
    assert np.isclose(ours["accuracy"], accuracy_score(y, pred), **TIGHT)
    assert np.isclose(ours["macro_f1"], f1_score(y, pred, average="macro"), **TIGHT)
    # plain arrays, many ties, default labels = sorted union (as scikit-learn)
    a, b = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
    assert np.isclose(m.qwk(a, b), cohen_kappa_score(a, b, weights="quadratic"), **TIGHT)
    assert np.isclose(m.balanced_accuracy(a, b), balanced_accuracy_score(a, b), **TIGHT)
    assert np.isclose(m.macro_f1(a, b), f1_score(a, b, average="macro"), **TIGHT)
    assert np.isclose(m.accuracy(a, b), accuracy_score(a, b), **TIGHT)


@pytest.mark.parametrize("seed", range(5))
def test_c_index_equals_lifelines_with_ties_and_censoring(seed):
    df = _surv_df(np.random.default_rng(seed), 150)
    ours = predictions.task_metrics("survival", df)["c_index"]
    ref = concordance_index(df["time"], -df["risk"], df["event"])
    assert np.isclose(ours, ref, **TIGHT)
    assert np.isclose(m.c_index(df["time"], df["event"], df["risk"]), ref, **TIGHT)


@pytest.mark.parametrize("classes", [["neg", "pos"], ["LUAD", "LUSC", "normal"]])
def test_stratified_auc_compares_pairs_within_folds_only(classes):
    rng = np.random.default_rng(1)
    df = _cls_df(rng, 120, classes).assign(fold=np.repeat([0, 1, 2], 40))
    expected = _fold_weighted_auc([df[df["fold"] == f] for f in range(3)], classes)
    cases = predictions.prepare("classification", df, strata="fold")
    assert np.isclose(cases.point()["auc"], expected, **TIGHT)
    # fold 1's model scores every case lower (x 0.5, exact in floating point): the stratified AUC does
    # not see it, a plain one does
    shifted = df.copy()
    cols = [f"prob_{c}" for c in classes]
    shifted.loc[df["fold"] == 1, cols] = shifted.loc[df["fold"] == 1, cols] * 0.5
    assert np.isclose(predictions.prepare("classification", shifted, strata="fold").point()["auc"], expected, **TIGHT)
    assert not np.isclose(predictions.task_metrics("classification", shifted)["auc"], predictions.task_metrics("classification", df)["auc"])


def _pair_counts(time, event, risk) -> tuple[float, float]:
    """(comparable, concordant) pairs, one pair at a time: i has an event and t_i < t_j, or t_i = t_j
    with j censored; concordant when risk_i > risk_j, 1/2 on tied risks."""
    comparable = concordant = 0.0
    for i in np.flatnonzero(event):
        for j in range(len(time)):
            if time[j] > time[i] or (time[j] == time[i] and not event[j]):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return comparable, concordant


@pytest.mark.parametrize("seed", range(3))
def test_stratified_c_index_compares_pairs_within_folds_only(seed):
    rng = np.random.default_rng(seed)
    df = _surv_df(rng, 90).assign(fold=rng.integers(0, 3, 90))
    counts = []
    for _, part in df.groupby("fold"):
        t, e, r = part["time"].to_numpy(), part["event"].to_numpy().astype(bool), part["risk"].to_numpy()
        counts.append(_pair_counts(t, e, r))
        assert np.isclose(counts[-1][1] / counts[-1][0], concordance_index(t, -r, e), **TIGHT)  # the counter is right
    expected = sum(c for _, c in counts) / sum(n for n, _ in counts)
    ours = m.c_index(df["time"], df["event"], df["risk"], strata=df["fold"])
    assert np.isclose(ours, expected, **TIGHT)
    assert np.isclose(predictions.prepare("survival", df, strata="fold").point()["c_index"], expected, **TIGHT)
    # each fold's model has its own risk offset: the stratified C-index does not see it, a plain one does
    shifted = df["risk"] + 10.0 * df["fold"]
    assert np.isclose(m.c_index(df["time"], df["event"], shifted, strata=df["fold"]), expected, **TIGHT)
    assert not np.isclose(m.c_index(df["time"], df["event"], shifted), m.c_index(df["time"], df["event"], df["risk"]))


def test_pooled_c_index_is_taken_within_test_folds(tmp_path):
    """Two folds, each ranked perfectly by its own model, on offset risk scales: pooled C = 1."""
    rng = np.random.default_rng(0)
    runs = []
    for fold, offset in ((0, 0.0), (1, 500.0)):  # fold 1: later times, yet higher risks
        time = rng.permutation(np.arange(1.0, 21.0)) + 100 * fold
        df = pd.DataFrame({"case_id": [f"f{fold}c{i:02d}" for i in range(20)], "time": time,
                           "event": 1, "risk": offset - time})
        for method in ("good", "flat"):
            runs.append(write_run(tmp_path, "e2e", "os", "survival", method, fold,
                                  df.assign(risk=df["risk"] if method == "good" else 0.0)))
    pooled_plain = pd.concat([pd.read_csv(r.path("predictions"), sep="\t") for r in runs if r.method == "good"])
    # cross-fold pairs are all discordant
    assert m.c_index(pooled_plain["time"], pooled_plain["event"], pooled_plain["risk"]) < 0.5
    metrics, paired = ev.evaluate(runs, "survival", n_boot=50, seed=0, alpha=0.05, reference="flat")
    pooled = metrics[(metrics["fold"] == "pooled")].set_index("method")["point"]
    assert pooled["good"] == 1.0 and pooled["flat"] == 0.5
    assert np.isclose(paired.set_index("method").loc["good", "diff_point"], 0.5)


def test_main_metric_and_bad_input():
    assert (m.main_metric("classification"), m.main_metric("grading"), m.main_metric("survival")) == \
        ("auc", "accuracy", "c_index")  # what the paper reports
    with pytest.raises(ValueError, match="unknown task type"):
        m.main_metric("regression")
    df = _cls_df(np.random.default_rng(0), 10, ["a", "b"])
    df.loc[3, "label"] = "c"
    with pytest.raises(ValueError, match="case0003.*'c'"):
        predictions.task_metrics("classification", df)
    with pytest.raises(ValueError, match="risk"):
        predictions.task_metrics("survival", _surv_df(np.random.default_rng(0), 5).drop(columns="risk"))


def test_undefined_metrics_are_nan_with_warning(caplog):
    df = _cls_df(np.random.default_rng(0), 12, ["a", "b"])
    df["label"] = "a"  # a fold with a single class
    with caplog.at_level(logging.WARNING, logger="e2epath.core.metrics"):
        out = predictions.task_metrics("classification", df)
    assert np.isnan(out["auc"]) and not np.isnan(out["accuracy"])
    assert any("auc is undefined" in r.getMessage() for r in caplog.records)
    iv = bs.bootstrap(predictions.prepare("classification", df), n_boot=20, seed=0, alpha=0.05)["auc"]
    assert iv.n_valid == 0 and np.isnan(iv.mean) and np.isnan(iv.ci_low)
    surv = _surv_df(np.random.default_rng(0), 8).assign(event=0)
    assert np.isnan(predictions.task_metrics("survival", surv)["c_index"])


# --------------------------------------------------------------------------- bootstrap

def _loop_reference(task_type, df, idx):
    """Slow reference: scikit-learn / lifelines on each resample (NaN where they cannot compute)."""
    cases = predictions.prepare(task_type, df)  # sorted by case_id: the order the indices refer to
    out = {name: [] for name in cases.metric_names}
    for rows in idx:
        if task_type == "survival":
            try:
                out["c_index"].append(concordance_index(cases.time[rows], -cases.risk[rows], cases.event[rows]))
            except ZeroDivisionError:
                out["c_index"].append(np.nan)
            continue
        y, prob = cases.y[rows], cases.prob[rows]
        pred = prob.argmax(1)
        k = len(cases.classes)
        try:
            auc = (roc_auc_score(y == 1, prob[:, 1]) if k == 2 else
                   roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(k))))
        except ValueError:
            auc = np.nan
        out["auc"].append(auc)
        out["accuracy"].append(accuracy_score(y, pred))
        out["balanced_accuracy"].append(balanced_accuracy_score(y, pred))
        out["macro_f1"].append(f1_score(y, pred, average="macro"))
        if task_type == "grading":
            out["qwk"].append(cohen_kappa_score(y, pred, labels=list(range(k)), weights="quadratic"))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("task_type,df", [
    ("classification", _cls_df(np.random.default_rng(1), 40, ["a", "b"])),
    ("classification", _cls_df(np.random.default_rng(2), 45, ["x", "y", "z"])),
    ("grading", _cls_df(np.random.default_rng(3), 50, [0, 1, 2, 3], signal=2.0)),
    ("survival", _surv_df(np.random.default_rng(4), 40)),
])
def test_vectorised_bootstrap_equals_loop(task_type, df):
    cases = predictions.prepare(task_type, df)
    idx = bs.resample_indices(cases.n, 50, seed=7)
    fast = bs.resampled_metrics(cases, idx)
    slow = _loop_reference(task_type, df, idx)
    for name in cases.metric_names:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=1e-12, equal_nan=True, err_msg=name)
    # summary statistics are those of the defined resamples
    iv = bs.bootstrap(cases, n_boot=50, seed=7, alpha=0.05)[m.main_metric(task_type)]
    ref = slow[m.main_metric(task_type)]
    ref = ref[~np.isnan(ref)]
    assert iv.n_valid == ref.size and np.isclose(iv.mean, ref.mean(), **TIGHT)
    assert np.isclose(iv.ci_low, np.percentile(ref, 2.5), **TIGHT)


def test_bootstrap_deterministic_and_interval_contains_point():
    cases = predictions.prepare("survival", _surv_df(np.random.default_rng(0), 200))
    a = bs.bootstrap(cases, n_boot=200, seed=3, alpha=0.05)["c_index"]
    b = bs.bootstrap(cases, n_boot=200, seed=3, alpha=0.05)["c_index"]
    c = bs.bootstrap(cases, n_boot=200, seed=4, alpha=0.05)["c_index"]
    assert a == b and a.mean != c.mean
    assert a.ci_low < a.point < a.ci_high
    cls = predictions.prepare("classification", _cls_df(np.random.default_rng(0), 200, ["a", "b", "c"]))
    for iv in bs.bootstrap(cls, n_boot=200, seed=0, alpha=0.05).values():
        assert iv.ci_low <= iv.point <= iv.ci_high


def test_pooled_resamples_stay_within_their_folds():
    strata = np.repeat([2, 0, 1], [10, 7, 13])
    idx = bs.resample_indices(30, 300, seed=1, strata=strata)
    assert (strata[idx] == strata[None, :]).all()  # each fold keeps its size in every resample
    assert np.array_equal(idx, bs.resample_indices(30, 300, seed=1, strata=strata))
    assert len(np.unique(idx[:, strata == 0])) == 7  # and draws from all of its cases
    df = _surv_df(np.random.default_rng(2), 30).assign(fold=strata)
    pooled = predictions.prepare("survival", df, strata="fold")
    iv = bs.bootstrap(pooled, n_boot=300, seed=1, alpha=0.05)["c_index"]
    values = bs.resampled_metrics(pooled, bs.resample_indices(30, 300, seed=1, strata=pooled.strata))["c_index"]
    assert np.isclose(iv.mean, np.nanmean(values), **TIGHT)  # bootstrap() used the within-fold resamples
    moved = predictions.prepare("survival", df.assign(fold=np.roll(strata, 1)), strata="fold")
    with pytest.raises(ValueError, match="different test folds"):
        bs.paired_bootstrap(pooled, moved, n_boot=10, seed=0, alpha=0.05)


def test_paired_bootstrap():
    rng = np.random.default_rng(5)
    good = _cls_df(rng, 150, ["a", "b"], signal=2.0)
    noise = good.copy()
    noise["prob_a"] = rng.uniform(size=len(noise))
    noise["prob_b"] = 1 - noise["prob_a"]
    cg, cn = predictions.prepare("classification", good), predictions.prepare("classification", noise)
    self_diff = bs.paired_bootstrap(cg, cg, n_boot=100, seed=0, alpha=0.05)
    for pv in self_diff.values():
        assert pv.diff_point == 0 and pv.diff_mean == 0 and pv.ci_low == pv.ci_high == 0 and pv.p_value == 1
    diff = bs.paired_bootstrap(cg, cn, n_boot=200, seed=0, alpha=0.05)["auc"]
    y = good["label"] == "b"
    assert np.isclose(diff.diff_point, roc_auc_score(y, good["prob_b"]) - roc_auc_score(y, noise["prob_b"]), **TIGHT)
    assert diff.ci_low > 0 and diff.p_value < 0.05
    # the same numbers from scikit-learn on the same resample indices
    idx = bs.resample_indices(cg.n, 200, seed=0)
    yb = cg.y == 1
    d = np.array([roc_auc_score(yb[r], cg.prob[r, 1]) - roc_auc_score(yb[r], cn.prob[r, 1]) for r in idx])
    assert np.isclose(diff.diff_mean, d.mean(), **TIGHT)
    assert np.isclose(diff.ci_high, np.percentile(d, 97.5), **TIGHT)
    tails = ((d <= 0).sum() + 1) / 201, ((d >= 0).sum() + 1) / 201
    assert np.isclose(diff.p_value, min(1, 2 * min(tails)), **TIGHT)
    with pytest.raises(ValueError, match="same cases"):
        bs.paired_bootstrap(cg, predictions.prepare("classification", noise.iloc[:-1]), n_boot=10, seed=0, alpha=0.05)


# --------------------------------------------------------------------------- command lines

def _write_runs(root, task, classes):
    """Three methods × 2 folds (+ an empty third fold for the E2E one); returns run.json paths and frames."""
    rng = np.random.default_rng(0)
    full = {"e2e/abmilx_r18": _cls_df(rng, 60, classes, signal=2.5),
            "twostage/abmil_r50": _cls_df(rng, 60, classes, signal=0.5),
            "twostage/trans_mil": _cls_df(rng, 60, classes, signal=1.0)}
    runs = []
    for key, df in full.items():
        family, method = key.split("/")
        for fold, part in enumerate((df.iloc[:25], df.iloc[25:])):
            runs.append(write_run(root, family, task, "classification", method, fold, part))
    runs.append(write_run(root, "e2e", task, "classification", "abmilx_r18", 2, full["e2e/abmilx_r18"].iloc[:0]))
    return [r.path("run") for r in runs], full


def test_evaluate_and_tables_cli(tmp_path, caplog):
    task, classes = "brca_subtype", ["IDC", "ILC"]
    paths, full = _write_runs(tmp_path, task, classes)
    out, paired_out = tmp_path / "metrics" / f"{task}.tsv", tmp_path / "metrics" / f"{task}_paired.tsv"
    argv = ["--task", task, "--task-type", "classification", "--n-boot", "100", "--seed", "0", "--alpha", "0.05",
            "--out", str(out), "--paired-out", str(paired_out), "--cohorts", "--runs", *map(str, paths)]
    with caplog.at_level(logging.INFO):
        assert ev.cli(argv) == 0
    assert any("fold2" in r.getMessage() and "no rows" in r.getMessage() for r in caplog.records)

    res = pd.read_csv(out, sep="\t", dtype={"fold": str})
    assert list(res.columns) == ev.COLUMNS
    assert set(res["fold"]) == {"0", "1", "pooled"}  # the empty fold 2 is skipped
    assert set(res["family"]) == {"e2e", "twostage"}
    pooled = res[(res["fold"] == "pooled") & (res["method"] == "abmilx_r18")].set_index("metric")
    df = full["e2e/abmilx_r18"]
    ref, _, _ = _sk_classification(df, classes)
    ref["auc"] = _fold_weighted_auc([df.iloc[:25], df.iloc[25:]], classes)  # pairs within a test fold
    for name, value in ref.items():
        assert np.isclose(pooled.loc[name, "point"], value, **TIGHT)
    assert (pooled["n"] == 60).all()
    assert (res[res["fold"] == "0"]["n"] == 25).all()

    paired = pd.read_csv(paired_out, sep="\t")
    assert list(paired.columns) == ev.PAIRED_COLUMNS
    # default reference: the better two-stage method by pooled AUC
    ts = res[(res["fold"] == "pooled") & (res["family"] == "twostage") & (res["metric"] == "auc")]
    best_ts = ts.sort_values("point")["method"].iloc[-1]
    assert set(paired["reference"]) == {best_ts}
    assert set(paired["method"]) == {"abmilx_r18", "abmil_r50", "trans_mil"} - {best_ts}
    assert (paired["fold"] == "pooled").all() and (paired["p_value"] <= 1).all()

    # an unknown reference is an argument error, not a traceback; so is a run of another task
    assert ev.cli(argv + ["--reference", "nope"]) == 2
    other = write_run(tmp_path / "other", "e2e", "other_task", "classification", "x", 0, full["e2e/abmilx_r18"])
    with caplog.at_level(logging.ERROR):
        assert ev.cli(argv[:-1] + [str(other.path("run"))]) == 2
    assert "belongs to task 'other_task'" in caplog.text

    md, tex = tmp_path / "tables" / f"{task}.md", tmp_path / "tables" / f"{task}.tex"
    runs = [a for a in argv if a.endswith("run.json")]
    assert tables.cli(["--metrics", str(out), "--md-out", str(md), "--tex-out", str(tex), "--runs", *runs]) == 0
    md_text, tex_text = md.read_text(), tex.read_text()
    assert "Encoder weights" not in md_text  # these runs record no encoder

    # runs that record their encoder's checkpoint: each method's is listed under the table, by sha256
    for path in runs:
        meta = json.loads(Path(path).read_text())
        sha = "ab" * 32 if meta["method"] == "abmilx_r18" else None
        meta["encoder"] = {"name": "uni" if sha else "resnet18", "weights": "hf:MahmoodLab/UNI/pytorch_model.bin"
                           if sha else None, "path": "/cache/uni.bin" if sha else None, "sha256": sha}
        Path(path).write_text(json.dumps(meta))
    assert tables.cli(["--metrics", str(out), "--md-out", str(md), "--tex-out", str(tex), "--runs", *runs]) == 0
    weights_lines = md.read_text().split("Encoder weights:")[1]
    assert "| abmilx_r18 | uni | hf:MahmoodLab/UNI/pytorch_model.bin | abababababababab… |" in weights_lines
    assert "| trans_mil | resnet18 | random init | — |" in weights_lines
    # folds of one method that used different checkpoints are an error, not a table
    meta = json.loads(Path(runs[0]).read_text())
    twin = [p for p in runs if p != runs[0] and json.loads(Path(p).read_text())["method"] == meta["method"]][0]
    other = json.loads(Path(twin).read_text())
    other["encoder"] = {**meta["encoder"], "sha256": "cd" * 32}
    Path(twin).write_text(json.dumps(other))
    assert tables.cli(["--metrics", str(out), "--md-out", str(md), "--tex-out", str(tex), "--runs", *runs]) == 2
    Path(twin).write_text(json.dumps({**other, "encoder": meta["encoder"]}))
    best_auc = res[(res["fold"] == "pooled") & (res["metric"] == "auc")].sort_values("mean")["method"].iloc[-1]
    best_line = next(line for line in md_text.splitlines() if line.startswith(f"| {best_auc} |"))
    assert best_line.split("|")[2].strip().startswith("**")  # AUC column, best mean is bold
    worst = res[(res["fold"] == "pooled") & (res["metric"] == "auc")].sort_values("mean")["method"].iloc[0]
    worst_line = next(line for line in md_text.splitlines() if line.startswith(f"| {worst} |"))
    assert not worst_line.split("|")[2].strip().startswith("**")
    assert "abmil\\_r50 &" in tex_text and "trans\\_mil &" in tex_text and "abmil_r50" not in tex_text
    assert "\\textbf{" in tex_text and "\\toprule" in tex_text and "\\bottomrule" in tex_text
    assert tex_text.index("Two-stage") < tex_text.index("End-to-end")
    unescaped = tex_text.replace("\\{", "").replace("\\}", "")
    assert unescaped.count("{") == unescaped.count("}")


def test_tables_bold_ties_and_escape():
    rows = []
    for method, family, mean in (("a_1", "e2e", 0.912), ("b_2", "twostage", 0.9121), ("c%3", "twostage", 0.70)):
        rows.append(["internal", method, family, "case", "pooled", "c_index", mean, mean, mean - 0.05, mean + 0.05,
                     np.nan, 50])
    table = tables.pooled_table(pd.DataFrame(rows, columns=ev.COLUMNS))
    md = tables.to_markdown(table, decimals=1)
    assert "| a_1 | **91.2 [86.2, 96.2]** |" in md and "| b_2 | **91.2" in md  # tie at shown precision
    assert "| c%3 | 70.0 [65.0, 75.0] |" in md
    tex = tables.to_latex(table, decimals=1)
    assert "c\\%3 & 70.0 [65.0, 75.0] \\\\" in tex and "a\\_1 & \\textbf{91.2 [86.2, 96.2]}" in tex


@pytest.mark.parametrize("task_type", ["classification", "survival"])
def test_slide_and_case_metrics_equal_the_reference_libraries_on_the_same_units(tmp_path, task_type):
    """Slide bags on a cohort whose cases have 1-3 slides: metrics per slide (the slides' own rows)
    and per case (the mean of a case's slide probabilities / risks), both in metrics.tsv."""
    rng = np.random.default_rng(3)
    frames = []
    for fold in range(2):
        rows = []
        for c in range(20):
            case = f"F{fold}-C{c:02d}"
            positive, time, event = c % 2, float(rng.integers(1, 40)), int(rng.random() < 0.7)
            for s in range(1 + c % 3):
                score = rng.normal(positive * 1.2, 1.0)
                row = {"slide_id": f"{case}-S{s}", "case_id": case}
                if task_type == "survival":
                    row.update(time=time, event=event, risk=score - 0.02 * time)
                else:
                    p = 1 / (1 + np.exp(-score))
                    row.update(label="pos" if positive else "neg", prob_neg=1 - p, prob_pos=p)
                rows.append(row)
        frames.append(pd.DataFrame(rows))
    runs = [write_run(tmp_path, "e2e", "t", task_type, "abx", k, df) for k, df in enumerate(frames)]
    metrics, _ = ev.evaluate(runs, task_type, n_boot=20, seed=0, alpha=0.05)
    assert set(metrics["unit"]) == {"slide", "case"} and ev.primary_unit(metrics) == "slide"
    for fold, df in enumerate(frames):
        cases = df.groupby("case_id").agg({c: "first" if c in ("label", "time", "event") else "mean"
                                           for c in df.columns if c not in ("slide_id", "case_id")})
        for unit, table in (("slide", df), ("case", cases)):
            got = metrics[(metrics["unit"] == unit) & (metrics["fold"].astype(str) == str(fold))].set_index("metric")
            assert (got["n"] == len(table)).all()
            if task_type == "survival":
                want = concordance_index(table["time"], -table["risk"], table["event"])
                assert np.isclose(got.loc["c_index", "point"], want, **TIGHT), unit
            else:
                y = table["label"] == "pos"
                assert np.isclose(got.loc["auc", "point"], roc_auc_score(y, table["prob_pos"]), **TIGHT), unit
                pred = np.where(table["prob_pos"] > table["prob_neg"], "pos", "neg")
                assert np.isclose(got.loc["accuracy", "point"], accuracy_score(table["label"], pred), **TIGHT), unit
    assert len(frames[0]) > 20  # the slide and case numbers really differ


def _write_cohort(root: Path, cohort: str, task: str, task_type: str, method: str, family: str,
                  folds: list[pd.DataFrame], labels_missing: int = 0) -> Path:
    """An external cohort's predictions by one method as `predict_cohort` lays them out (written by
    hand here), the ensemble the mean of the folds' scores; the first ``labels_missing`` rows unlabelled."""
    folder = root / layout.COHORT_PREDICTIONS.format(cohort=cohort, task=task, method=method)
    folder.mkdir(parents=True)
    label_cols = ["time", "event"] if task_type == "survival" else ["label"]
    folds = [f.copy() for f in folds]
    for f in folds:
        f.loc[: labels_missing - 1, label_cols] = np.nan
    score_cols = [c for c in folds[0].columns if c == "risk" or c.startswith("prob_")]
    ens = folds[0].copy()
    ens[score_cols] = sum(f[score_cols].to_numpy(float) for f in folds) / len(folds)
    names = []
    for k, f in enumerate(folds):
        f.to_csv(folder / f"fold{k}.tsv", sep="\t", index=False)
        names.append(f"fold{k}.tsv")
    ens.to_csv(folder / "ensemble.tsv", sep="\t", index=False)
    rec = {"cohort": cohort, "task": task, "task_type": task_type, "method": method, "family": family,
           "bag": "case", "folds": list(range(len(folds))), "predictions": names, "ensemble": "ensemble.tsv"}
    (folder / "prediction.json").write_text(json.dumps(rec))
    return folder / "prediction.json"


@pytest.mark.parametrize("task_type", ["classification", "survival"])
def test_external_cohort_metrics_equal_the_reference_libraries(tmp_path, task_type):
    """Labelled external cohort: the ensemble's and each fold model's point estimates equal
    scikit-learn / lifelines on the labelled rows; `folds` is their mean ± sd; paired rows per cohort."""
    rng = np.random.default_rng(5)
    task = "t"
    internal, runs = {}, []
    for method, family in (("m_e2e", "e2e"), ("m_ts", "twostage")):
        for fold in range(2):
            df = (_survival_frame(rng, 30, f"I{fold}") if task_type == "survival"
                  else _class_frame(rng, 30, f"I{fold}"))
            runs.append(write_run(tmp_path, family, task, task_type, method, fold, df))
            internal[method, fold] = df
    records = []
    ext = {}
    for method, family in (("m_e2e", "e2e"), ("m_ts", "twostage")):
        folds = [(_survival_frame(rng, 40, "X") if task_type == "survival" else _class_frame(rng, 40, "X"))
                 for _ in range(2)]
        for f in folds[1:]:  # one cohort: the same cases and labels in every fold model's table
            for c in ("case_id", "time", "event", "label"):
                if c in f.columns:
                    f[c] = folds[0][c]
        ext[method] = folds
        records.append(_write_cohort(tmp_path, "cptac", task, task_type, method, family, folds, labels_missing=3))
    metrics, paired = ev.evaluate(read_runs([r.path("run") for r in runs]), task_type, 50, 0, 0.05, cohorts=records)
    assert set(metrics["cohort"]) == {"internal", "cptac"}
    main = "c_index" if task_type == "survival" else "auc"

    def reference(df):
        df = df.iloc[3:]  # the unlabelled rows are not scored
        if task_type == "survival":
            return concordance_index(df["time"], -df["risk"], df["event"])
        return roc_auc_score(df["label"] == "b", df["prob_b"])

    for method, folds in ext.items():
        rows = metrics[(metrics["cohort"] == "cptac") & (metrics["method"] == method) & (metrics["metric"] == main)]
        rows = rows.set_index(rows["fold"].astype(str))
        score = [c for c in folds[0].columns if c == "risk" or c.startswith("prob_")]
        ens = folds[0].copy()
        ens[score] = (folds[0][score].to_numpy(float) + folds[1][score].to_numpy(float)) / 2
        assert np.isclose(rows.at["ensemble", "point"], reference(ens), **TIGHT)
        points = [reference(f) for f in folds]
        for k in range(2):
            assert np.isclose(rows.at[str(k), "point"], points[k], **TIGHT)
        assert np.isclose(rows.at["folds", "mean"], np.mean(points), **TIGHT)
        assert np.isclose(rows.at["folds", "sd"], np.std(points, ddof=1), **TIGHT)
        assert rows.at["ensemble", "n"] == 37
    ext_paired = paired[paired["cohort"] == "cptac"]
    assert len(ext_paired) and set(ext_paired["fold"]) == {"ensemble"}
    assert set(paired["cohort"]) == {"internal", "cptac"}
    # the table shows both cohorts side by side; the forest plot a panel each
    table = tables.pooled_table(metrics)
    assert [c for c, _ in table.columns][0] == "internal" and "cptac" in {c for c, _ in table.columns}
    md = tables.to_markdown(table)
    label = "C-index" if task_type == "survival" else "AUC"
    header = md.splitlines()[0]
    assert header.index(f"{label} (internal)") < header.index(f"{label} (cptac)")
    from e2epath.figures import forest
    assert len(forest.plot_forest(metrics, main).axes) == 4  # two cohort panels, each with its number axis
    tex = tables.to_latex(table)
    assert "\\multicolumn{" in tex and "cptac" in tex and "\\cmidrule" in tex


def _class_frame(rng, n: int, prefix: str) -> pd.DataFrame:
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.2 * y)))
    return pd.DataFrame({"case_id": [f"{prefix}-{i:03d}" for i in range(n)], "label": np.where(y, "b", "a"),
                         "prob_a": 1 - p, "prob_b": p})


def _survival_frame(rng, n: int, prefix: str) -> pd.DataFrame:
    risk = rng.normal(0, 1, n)
    return pd.DataFrame({"case_id": [f"{prefix}-{i:03d}" for i in range(n)],
                         "time": np.round(rng.exponential(np.exp(-risk) * 20) + 0.5, 2),
                         "event": (rng.uniform(size=n) < 0.7).astype(int), "risk": risk})
