"""Give each concurrent GPU job its own device.

Snakemake counts `gpu` resources but never says *which* GPU a job gets, so N concurrent jobs
all land on GPU 0. A job claims a device by taking an exclusive `flock` on one lock file per
device index and exports `CUDA_VISIBLE_DEVICES` to it; the lock dies with the process, so a
killed job never leaks a device. Devices already narrowed by SLURM (`CUDA_VISIBLE_DEVICES`)
are honoured: the job only chooses among those.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


def candidate_devices() -> list[str]:
    """Device ids this job may use: SLURM's/the user's CUDA_VISIBLE_DEVICES, else all GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() != ""]
    fake = os.environ.get("E2EPATH_GPU_COUNT")  # tests and machines without nvidia-smi
    if fake is not None:
        return [str(i) for i in range(int(fake))]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def lock_dir() -> Path:
    path = Path(os.environ.get("E2EPATH_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"e2epath-gpu-{os.getuid()}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def claim_gpu(n_gpus: int, poll_s: float = 2.0) -> Iterator[list[str]]:
    """Hold ``n_gpus`` device locks for the duration; yields the claimed device ids."""
    if n_gpus <= 0:
        yield []
        return
    devices = candidate_devices()
    if not devices:
        logger.info("no CUDA device visible: running on the CPU")
        yield []
        return
    if n_gpus > len(devices):
        raise RuntimeError(f"job asks for {n_gpus} GPUs but only {devices} are visible")
    held: list[tuple[str, int]] = []
    waited = False
    while len(held) < n_gpus:
        for dev in devices:
            if len(held) == n_gpus or dev in dict(held):
                continue
            fd = os.open(lock_dir() / f"gpu{dev}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((dev, fd))
            except BlockingIOError:
                os.close(fd)
        if len(held) < n_gpus:
            if not waited:
                logger.info("all GPUs %s busy; waiting for one to free up", devices)
                waited = True
            time.sleep(poll_s)
    claimed = [d for d, _ in held]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    logger.info("claimed GPU %s", ",".join(claimed))
    try:
        yield claimed
    finally:
        for _, fd in held:
            os.close(fd)
