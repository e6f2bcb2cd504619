"""The attention file of a run or of a cohort's predictions (docs/contracts.md `attention.npz`):
``__magnification__``, and per slide its attention [heads, N] float32 and ``{slide}__coords`` [N, 2]
int32 level-0 x, y of its patches. Training and cohort prediction write it, figures and maps read it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from e2epath.core.io import atomic_path


def split_attention(attention: list[tuple[Any, list[tuple[str, np.ndarray]]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-bag attention (a torch tensor [heads, N]) with the bag's (slide, coords) parts → slide →
    (attention, coords); no torch import here: figures read attention files without it."""
    maps = {}
    for attn, parts in attention:
        start = 0
        for slide, coords in parts:
            maps[slide] = (attn[:, start:start + len(coords)].float().cpu().numpy(), coords)
            start += len(coords)
    return maps


def write_attention(path: Path, magnification: int, attention: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``attention.npz`` (docs/contracts.md): ``__magnification__``, and per slide its attention
    [heads, N] float32 and ``{slide}__coords`` [N, 2] int32 level-0 x, y."""
    arrays = {"__magnification__": np.array(magnification)}
    for slide, (attn, coords) in attention.items():
        arrays[slide] = attn.astype(np.float32)
        arrays[f"{slide}__coords"] = coords.astype(np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def slide_ids(npz) -> list[str]:
    """The slides of an open attention.npz."""
    return sorted(k for k in npz.files if not k.startswith("__") and not k.endswith("__coords"))


def read_heads(npz, slide: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Attention [heads, N] (float64) and coords [N, 2] (int64 level-0 x, y) of one slide from an
    open attention.npz; errors name file and key."""
    if slide not in npz.files:
        raise ValueError(f"{source}: no attention of slide {slide}")
    if f"{slide}__coords" not in npz.files:
        raise ValueError(f"{source}: key {slide}__coords missing (see docs/contracts.md attention.npz)")
    att = np.asarray(npz[slide], dtype=np.float64)
    coords = np.asarray(npz[f"{slide}__coords"]).astype(np.int64).reshape(-1, 2)
    att = att.reshape(1, -1) if att.ndim == 1 else att
    if att.ndim != 2 or att.shape[1] != len(coords):
        raise ValueError(f"{source}: {slide} has attention of shape {list(att.shape)} but {len(coords)} coords")
    return att, coords
