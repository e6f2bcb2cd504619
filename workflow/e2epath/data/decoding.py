"""Threaded JPEG decoding of a store's patches, in order: what full-bag evaluation, feature extraction
and `predict` read stores with (training bags decode in DataLoader workers instead)."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from e2epath.preprocess.store import LmdbReader, decode_jpeg


def decode_batch(jpegs: list[bytes], first: int, where: str) -> Tensor:
    """JPEG bytes → uint8 [B, H, W, 3] at the stored size (runs in a worker thread)."""
    rgb = []
    for k, data in enumerate(jpegs):
        try:
            rgb.append(decode_jpeg(data))
        except ValueError as err:
            raise ValueError(f"{where}: patch {first + k}: {err}; re-run the patch rule for this slide") from err
    return torch.from_numpy(np.stack(rgb))


class PatchBatches:
    """A store's patches as uint8 [B, H, W, 3] batches, in order, ``workers`` batches ahead.

    JPEG bytes are read from LMDB in the calling thread (the store's shared environment is not
    thread-safe to open) and decoded in the pool. ``workers=0`` decodes inline.
    """

    def __init__(self, store: LmdbReader, batch_size: int, workers: int) -> None:
        self.store, self.batch_size, self.workers = store, batch_size, workers
        self.starts = range(0, len(store), batch_size)

    def __len__(self) -> int:
        return len(self.starts)

    def _jpegs(self, start: int) -> list[bytes]:
        return [self.store.get_jpeg(i) for i in range(start, min(start + self.batch_size, len(self.store)))]

    def __iter__(self) -> Iterator[Tensor]:
        where = str(self.store.path)
        if self.workers <= 0:
            for start in self.starts:
                yield decode_batch(self._jpegs(start), start, where)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            todo = iter(self.starts)
            for start in todo:  # keep one batch per worker in flight, plus the one being used
                pending.append(pool.submit(decode_batch, self._jpegs(start), start, where))
                if len(pending) > self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def decode_threads_for(dev: torch.device) -> int:
    """Threads that decode the next chunks while the encoder runs: 2 beside a GPU; on CPU only the
    cores torch leaves free (decoding threads next to torch's own on the same cores slow both:
    bench/inference.py)."""
    if dev.type == "cuda":
        return 2
    return max(0, min(2, len(os.sched_getaffinity(0)) - torch.get_num_threads()))
