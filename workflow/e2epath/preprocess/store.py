"""The patch store: one single-file LMDB per slide × magnification (docs/contracts.md), and the
one JPEG encoder / decoder of patches. Every stage may use it: preprocessing writes stores,
training, feature extraction and figures read them.

Keys: ``b"%08d" % i`` → RGB patch JPEG; ``b"__meta__"`` → JSON; ``b"__coords__"`` → little-endian
int32 (n, 2) level-0 top-left corners; ``b"__tissue__"`` → little-endian float32 (n,) tissue
fraction. A store whose status is not ``ok`` has no patch keys.

:class:`LmdbWriter` writes to a temporary name and renames when :meth:`LmdbWriter.close` succeeds;
:class:`LmdbReader` opens lazily and survives pickling into DataLoader workers.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import lmdb
import numpy as np

from e2epath.core.io import remove_stale_temporaries, tmp_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY, COORDS_KEY, TISSUE_KEY = b"__meta__", b"__coords__", b"__tissue__"
META_FIELDS = ("slide_id", "magnification", "mpp", "slide_mpp", "patch_size", "n_patches", "read_level",
               "read_downsample", "read_mpp", "scale", "jpeg_quality", "status", "message")


# Decode straight to RGB when OpenCV can (≥ 4.10), saving a colour conversion per patch.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def patch_key(i: int) -> bytes:
    return b"%08d" % i


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """RGB uint8 [H, W, 3] → JPEG bytes at ``quality``."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(jpeg: bytes | memoryview) -> np.ndarray:
    """JPEG bytes → RGB uint8 [H, W, 3]; ValueError when they are not a decodable JPEG."""
    buf = np.frombuffer(jpeg, np.uint8)
    if _IMREAD_RGB is not None:
        rgb = cv2.imdecode(buf, _IMREAD_RGB)
    else:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        rgb = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb is None:
        raise ValueError("patch is not a decodable JPEG")
    return rgb


class LmdbWriter:
    """Append patches, then :meth:`close` with the meta; the file appears only when complete.

    Use as a context manager: an exception inside the block removes the temporary file.
    """

    def __init__(self, path: str | Path, capacity_bytes: int, commit_every: int = 256) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(self.path):  # left by a killed writer of this store
            logger.info("removed %s, left behind by an interrupted job", stale)
        self.tmp = tmp_name(self.path)
        self.tmp.unlink(missing_ok=True)
        # map_size is virtual address space only; the file grows with what is written.
        self.env = lmdb.open(str(self.tmp), subdir=False, map_size=int(capacity_bytes) + (64 << 20),
                             lock=False, readahead=False, meminit=False)
        self.commit_every = commit_every
        self.coords: list[tuple[int, int]] = []
        self.tissue: list[float] = []
        self._txn = self.env.begin(write=True)

    def __len__(self) -> int:
        return len(self.coords)

    def add(self, jpeg: bytes, xy: tuple[int, int], tissue: float) -> None:
        self._txn.put(patch_key(len(self.coords)), jpeg)
        self.coords.append((int(xy[0]), int(xy[1])))
        self.tissue.append(float(tissue))
        if len(self.coords) % self.commit_every == 0:
            self._txn.commit()
            self._txn = self.env.begin(write=True)

    def close(self, meta: dict[str, Any]) -> Path:
        """Write meta, coords and tissue, sync, and rename onto the final path."""
        meta = {**meta, "n_patches": len(self.coords), "format_version": FORMAT_VERSION}
        if meta.get("status") != "ok" and self.coords:
            raise ValueError(f"{self.path}: a store with status {meta.get('status')!r} must hold no patches")
        txn = self._txn
        txn.put(META_KEY, json.dumps(meta).encode())
        txn.put(COORDS_KEY, np.asarray(self.coords, "<i4").reshape(-1, 2).tobytes())
        txn.put(TISSUE_KEY, np.asarray(self.tissue, "<f4").tobytes())
        txn.commit()
        self._txn = None
        self.env.sync(True)
        self.env.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self.env.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._txn is not None:
            self.abort()


def write_empty_store(path: str | Path, meta: dict[str, Any]) -> Path:
    """A store with only meta (status not ok, n_patches 0)."""
    with LmdbWriter(path, capacity_bytes=1 << 20) as w:
        return w.close(meta)


# py-lmdb refuses to open one file twice in a process, so readers of the same store share one
# environment. The cache is per process (dropped after a fork) and keeps at most MAX_OPEN_STORES
# files open (bags of many slides × magnifications would otherwise exhaust file descriptors).
MAX_OPEN_STORES = 128
_ENVS: "OrderedDict[str, lmdb.Environment]" = OrderedDict()
_ENVS_PID: int | None = None


def _shared_env(path: Path) -> lmdb.Environment:
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        _ENVS.clear()  # the parent's handles must not be used after a fork
        _ENVS_PID = os.getpid()
    key = str(path.resolve())
    env = _ENVS.pop(key, None)
    if env is None:
        env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    _ENVS[key] = env
    while len(_ENVS) > MAX_OPEN_STORES:
        _ENVS.popitem(last=False)[1].close()
    return env


def close_all() -> None:
    """Close every store opened for reading in this process."""
    while _ENVS:
        _ENVS.popitem()[1].close()


class LmdbReader:
    """Read-only access to one store. Opens on first use (and anew in each forked worker);
    picklable, so a Dataset holding readers can go to DataLoader workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: patch store not found")
        self._meta: dict[str, Any] | None = None
        self._coords: np.ndarray | None = None
        self._tissue: np.ndarray | None = None

    def _get(self, key: bytes) -> bytes:
        with _shared_env(self.path).begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"{self.path}: no key {key!r}")
        return value

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads(self._get(META_KEY))
        return self._meta

    @property
    def coords(self) -> np.ndarray:
        """int32 (n, 2) level-0 (x, y) of each patch's top-left corner."""
        if self._coords is None:
            self._coords = np.frombuffer(self._get(COORDS_KEY), "<i4").reshape(-1, 2).astype(np.int32)
        return self._coords

    @property
    def tissue(self) -> np.ndarray:
        if self._tissue is None:
            self._tissue = np.frombuffer(self._get(TISSUE_KEY), "<f4").astype(np.float32)
        return self._tissue

    def __len__(self) -> int:
        return int(self.meta["n_patches"])

    def get_jpeg(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: patch {i} out of range (n={len(self)})")
        return self._get(patch_key(i))

    def iter_jpegs(self, indices: Iterable[int]) -> Iterator[memoryview]:
        """JPEG bytes of patches ``indices``, read in one transaction as zero-copy views of the
        memory map (`get_jpeg` pays a transaction and a copy per patch). A view is valid only
        until the next one is drawn: decode it first."""
        with _shared_env(self.path).begin(buffers=True) as txn:
            for i in indices:
                buf = txn.get(patch_key(int(i)))
                if buf is None:
                    raise KeyError(f"{self.path}: no patch {i} (store holds {len(self)}); re-run its patch job")
                yield buf

    def keys(self) -> list[bytes]:
        """Every key in the store (patch keys and the ``__meta__``-style records)."""
        with _shared_env(self.path).begin() as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def get_rgb(self, i: int) -> np.ndarray:
        """Patch ``i`` decoded to RGB uint8 (patch_size × patch_size × 3)."""
        return decode_jpeg(self.get_jpeg(i))

    def iter_rgb(self, indices: Iterable[int]) -> Iterator[np.ndarray]:
        """Patches ``indices`` decoded to RGB straight from the memory map. Consume each before the
        next: one live decode buffer stays hot in the CPU cache. A bad patch names the store and index."""
        indices = list(indices)
        for i, buf in zip(indices, self.iter_jpegs(indices)):
            try:
                yield decode_jpeg(buf)
            except ValueError as err:
                raise ValueError(f"{self.path} patch {i}: {err}; re-run its patch job") from err
