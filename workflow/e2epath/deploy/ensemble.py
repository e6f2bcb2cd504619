"""Ensembles of trained models: the fold models of a method predicting an external cohort, or the
models given to `python -m e2epath predict`. Their prediction is the mean class probability (or
mean risk) over the models; they must predict the same thing from the same patches (`SHARED`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from e2epath.core.io import file_sha256
from e2epath.train.modelfile import ModelFileError, read_model, rebuild

# What the models of one ensemble share: one task and its outputs, predicted from the same patches
# (one magnification, slides prepared alike). Cohort prediction also reads one kind of input for all
# of them (`check_members(..., also=...)`: family, encoder, bag unit).
SHARED = ("task", "task_type", "classes", "eval_magnification", "preprocess")


@dataclass
class Member:
    """One model of an ensemble: its file, the file's hash, its record, and the rebuilt network."""

    path: Path
    sha256: str
    record: dict[str, Any]
    net: nn.Module

    @property
    def spec(self) -> dict[str, Any]:
        return self.record["spec"]

    def value(self, key: str) -> Any:
        """A value the models of an ensemble may be compared on (`SHARED` and ``also`` keys)."""
        return self.record[key] if key in self.record else self.spec[key]


def load_members(paths: list[Path], dev: torch.device) -> list[Member]:
    """The models of ``paths`` rebuilt on ``dev``, in the given order (repeats dropped)."""
    out = []
    for path in dict.fromkeys(Path(p) for p in paths):
        rec = read_model(path)
        out.append(Member(path, file_sha256(path), rec, rebuild(rec, path).to(dev)))
    return out


def check_members(members: list[Member], also: tuple[str, ...] = ()) -> None:
    """ModelFileError naming two files when the models cannot form one ensemble (`SHARED`, and the
    ``also`` keys)."""
    first = members[0]
    for member in members[1:]:
        differ = [k for k in (*SHARED, *also) if member.value(k) != first.value(k)]
        if differ:
            raise ModelFileError(f"{member.path} and {first.path} differ in {', '.join(differ)}: they cannot form one "
                                 "ensemble; predict them in separate calls")


def score_columns(table: pd.DataFrame) -> list[str]:
    """The prediction columns of a table: ``prob_<class>`` or ``risk`` (docs/contracts.md)."""
    return [c for c in table.columns if c == "risk" or c.startswith("prob_")]


def mean_scores(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The ensemble's scores: the mean of the models' score columns, row by row (the tables list the
    same bags in the same order)."""
    cols = score_columns(tables[0])
    return pd.DataFrame(sum(t[cols].to_numpy(float) for t in tables) / len(tables), columns=cols)
