"""Patient-level splits: disjoint subsets, every case tested once, stratified, seeded, clear errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from e2epath.data.splits import SplitError, cli, make_splits


def classification(n_pos: int = 12, n_neg: int = 18) -> pd.DataFrame:
    cases = [f"P{i:02d}" for i in range(n_pos)] + [f"N{i:02d}" for i in range(n_neg)]
    return pd.DataFrame({"case_id": cases, "label": ["pos"] * n_pos + ["neg"] * n_neg})


def survival(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({"case_id": [f"C{i:02d}" for i in range(n)], "time": rng.uniform(1, 100, n).round(1),
                         "event": (rng.random(n) < 0.6).astype(int)})


def check_partition(splits: pd.DataFrame, cases: set[str], k: int) -> None:
    assert set(splits.columns) == {"case_id", "fold", "subset"}
    assert set(splits["fold"]) == set(range(k))
    for fold, part in splits.groupby("fold"):
        assert not part["case_id"].duplicated().any(), f"fold {fold}: a case in two subsets"
        assert set(part["case_id"]) == cases
        assert set(part["subset"]) == {"train", "val", "test"}
    tests = splits.loc[splits["subset"] == "test", "case_id"]
    assert sorted(tests) == sorted(cases), "every case is a test case in exactly one fold"


def test_kfold_classification_is_a_stratified_patient_partition():
    labels = classification()
    splits = make_splits(labels, "classification", "kfold", 3, 0.25, [0.7, 0.1, 0.2], seed=0)
    check_partition(splits, set(labels["case_id"]), 3)
    label = labels.set_index("case_id")["label"]
    for _, part in splits.groupby("fold"):
        test = label[part.loc[part["subset"] == "test", "case_id"]].value_counts()
        assert test.to_dict() == {"neg": 6, "pos": 4}  # 18:12 split into thirds
        val = label[part.loc[part["subset"] == "val", "case_id"]]
        assert set(val) == {"neg", "pos"}


def test_splits_are_seeded_and_independent_of_row_order():
    labels = classification()
    a = make_splits(labels, "classification", "kfold", 3, 0.25, [], seed=0)
    b = make_splits(labels.sample(frac=1, random_state=1), "classification", "kfold", 3, 0.25, [], seed=0)
    c = make_splits(labels, "classification", "kfold", 3, 0.25, [], seed=1)
    key = ["fold", "case_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    assert not a.sort_values(key)["subset"].reset_index(drop=True).equals(c.sort_values(key)["subset"].reset_index(drop=True))


def test_survival_is_stratified_by_event_and_time():
    labels = survival()
    splits = make_splits(labels, "survival", "kfold", 4, 0.2, [], seed=0)
    check_partition(splits, set(labels["case_id"]), 4)
    lab = labels.set_index("case_id")
    late = lab["time"] > lab["time"].median()
    strata = lab["event"].astype(str) + late.astype(str)
    overall = strata.value_counts()
    for _, part in splits.groupby("fold"):
        test = strata[part.loc[part["subset"] == "test", "case_id"]].value_counts()
        for s, n in overall.items():  # each event x time stratum spread evenly over the 4 test folds
            assert abs(test.get(s, 0) - n / 4) <= 1


def test_holdout_mode():
    labels = classification(20, 20)
    splits = make_splits(labels, "classification", "holdout", 5, 0.2, [0.6, 0.2, 0.2], seed=0)
    assert set(splits["fold"]) == {0}
    assert not splits["case_id"].duplicated().any() and set(splits["case_id"]) == set(labels["case_id"])
    sizes = splits["subset"].value_counts().to_dict()
    assert sizes == {"train": 24, "val": 8, "test": 8}
    label = labels.set_index("case_id")["label"]
    for subset in ("val", "test"):
        assert label[splits.loc[splits["subset"] == subset, "case_id"]].value_counts().to_dict() == {"neg": 4, "pos": 4}


def test_tiny_validation_still_holds_every_class():
    labels = classification(4, 5)
    splits = make_splits(labels, "classification", "kfold", 3, 0.1, [], seed=0)
    label = labels.set_index("case_id")["label"]
    for _, part in splits.groupby("fold"):
        assert set(label[part.loc[part["subset"] == "val", "case_id"]]) == {"neg", "pos"}


def test_a_class_too_small_to_stratify_is_a_clear_error():
    labels = pd.concat([classification(), pd.DataFrame({"case_id": ["R0", "R1"], "label": ["rare", "rare"]})])
    with pytest.raises(SplitError, match=r"'rare': 2 case\(s\).*at least 3.*fewer folds"):
        make_splits(labels, "classification", "kfold", 3, 0.25, [], seed=0)


def test_cli_writes_the_contract_table(tmp_path):
    labels = classification()
    labels.to_csv(tmp_path / "labels.csv", index=False)
    slides = pd.DataFrame({"slide_id": [f"S{c}" for c in labels["case_id"]], "case_id": labels["case_id"]})
    slides.to_csv(tmp_path / "slides.tsv", sep="\t", index=False)
    out = tmp_path / "splits" / "subtype.tsv"
    args = ["--labels", str(tmp_path / "labels.csv"), "--slides", str(tmp_path / "slides.tsv"), "--out", str(out),
            "--task", "subtype", "--task-type", "classification", "--mode", "kfold", "--k", "3",
            "--val-fraction", "0.25", "--holdout", "0.7", "0.1", "0.2", "--seed", "0"]
    assert cli(args) == 0
    table = pd.read_csv(out, sep="\t", dtype={"case_id": str})
    assert list(table.columns) == ["case_id", "fold", "subset"]
    check_partition(table, set(labels["case_id"]), 3)
    bad = pd.concat([labels, pd.DataFrame({"case_id": ["R0"], "label": ["rare"]})])
    bad.to_csv(tmp_path / "labels.csv", index=False)
    pd.concat([slides, pd.DataFrame({"slide_id": ["SR0"], "case_id": ["R0"]})]).to_csv(
        tmp_path / "slides.tsv", sep="\t", index=False)
    with pytest.raises(SystemExit, match="task subtype.*'rare': 1 case"):
        cli(args)
