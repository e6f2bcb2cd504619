"""How many patches a training bag takes from each magnification (eq. 2 of the paper: W. Tang et
al., NeurIPS 2025, arXiv:2506.02408; docs/method.md).

Pure arithmetic, shared by the config resolution (`methods`, checked before any job runs) and the
bag datasets (`data`).
"""
from __future__ import annotations


def scale_counts(n_instances: int, ratios: list[float]) -> list[int]:
    """ŝ_j per magnification: ⌊s·σ_j⌋ for each secondary one (all but the first), and the main
    (first) one takes the rest, so Σ ŝ_j = s exactly — the authors' loader takes s // mul_scale_ratio
    patches from the secondary scale and s minus that from the main one."""
    secondary = [int(n_instances * r + 1e-9) for r in ratios[1:]]
    return [n_instances - sum(secondary), *secondary]
