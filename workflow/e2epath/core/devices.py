"""Which device a job computes on: each concurrent GPU job gets its own GPU (`claim_gpu`), and
PyTorch code asks `torch_device()` which one to use.

Snakemake counts `gpu` resources but never says *which* GPU a job gets, so N concurrent jobs
all land on GPU 0. A job claims a device by taking an exclusive `flock` on one lock file per
device index and exports `CUDA_VISIBLE_DEVICES` to it; the lock dies with the process, so a
killed job never leaks a device. Devices already narrowed by SLURM (`CUDA_VISIBLE_DEVICES`)
are honoured: the job only chooses among those.

Devices are counted with `nvidia-smi`, never with CUDA in this process: once CUDA is
initialised, a later `CUDA_VISIBLE_DEVICES` is ignored. Call `claim_gpu` before anything
touches CUDA. Claiming needs no PyTorch (every rule claims through workflow/scripts/step.py);
`torch_device` imports it only when a step that computes with torch asks.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def candidate_devices() -> list[str]:
    """Device ids this job may use: SLURM's/the user's CUDA_VISIBLE_DEVICES, else all GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    fake = os.environ.get("E2EPATH_GPU_COUNT")  # tests, and machines without nvidia-smi
    if fake is not None:
        try:
            return [str(i) for i in range(int(fake))]
        except ValueError:
            raise ValueError(f"E2EPATH_GPU_COUNT={fake!r} is not a whole number of GPUs") from None
    return [str(i) for i in range(nvidia_smi_count())]


def torch_device():
    """The torch device this job computes on: its (first) claimed GPU when CUDA is available, else
    the CPU. Mixed precision and channels_last are used on CUDA only."""
    try:
        import torch
    except ImportError as err:  # the preprocessing env has no torch, and never asks
        raise RuntimeError("this step computes with PyTorch, which is not installed in its environment") from err
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def nvidia_smi_count() -> int:
    """GPUs the driver lists (0 without nvidia-smi), counted in a child process."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("nvidia-smi -L failed (%s): not assigning GPUs", err)
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def lock_dir() -> Path:
    """Where the per-device lock files live; one folder per SLURM allocation.

    SLURM already gives each allocation its own GPUs and may number them from 0 in every job,
    so jobs of different allocations must not share locks."""
    base = Path(os.environ.get("E2EPATH_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"e2epath-gpu-{os.getuid()}"))
    slurm_job = os.environ.get("SLURM_JOB_ID")
    path = base / f"slurm-{slurm_job}" if slurm_job and "CUDA_VISIBLE_DEVICES" in os.environ else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def try_lock(devices: list[str], n_gpus: int, folder: Path) -> list[tuple[str, int]]:
    """All-or-nothing: ``n_gpus`` free devices locked, or none held (two jobs that each hold
    one of the devices the other waits for would wait forever)."""
    held: list[tuple[str, int]] = []
    for dev in devices:
        fd = os.open(folder / f"gpu{dev}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((dev, fd))
        if len(held) == n_gpus:
            return held
    for _, fd in held:
        os.close(fd)
    return []


@contextmanager
def claim_gpu(n_gpus: int, poll_s: float = 2.0) -> Iterator[list[str]]:
    """Hold ``n_gpus`` device locks for the duration; yields the claimed device ids.

    Waits while all devices are taken. Sets ``CUDA_VISIBLE_DEVICES`` to the claimed ids, so
    the job's code uses ``cuda:0`` (..``cuda:n-1``)."""
    if n_gpus <= 0:
        yield []
        return
    devices = candidate_devices()
    if not devices:
        logger.info("no CUDA device visible: running on the CPU")
        yield []
        return
    if n_gpus > len(devices):
        raise RuntimeError(f"job asks for {n_gpus} GPUs but only {devices} are visible; "
                           f"lower the rule's `gpu` resource or make more devices visible")
    folder = lock_dir()
    held = try_lock(devices, n_gpus, folder)
    if not held:
        logger.info("all GPUs %s are busy; waiting for one to free up", devices)
    while not held:
        time.sleep(poll_s)
        held = try_lock(devices, n_gpus, folder)
    claimed = [d for d, _ in held]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    logger.info("claimed GPU %s (lock in %s)", ",".join(claimed), folder)
    try:
        yield claimed
    finally:
        for _, fd in held:
            os.close(fd)
