"""`claim_gpu`: each concurrent GPU job gets its own device, with real processes and real locks.

Fake devices come from E2EPATH_GPU_COUNT; every test gets its own lock folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2epath.core.devices import candidate_devices, claim_gpu

ROOT = Path(__file__).resolve().parents[1]
# A GPU job: claim, report the device, hold it until told to finish.
JOB = """
import logging, os, sys, time
from pathlib import Path
from e2epath.core.devices import claim_gpu
logging.basicConfig(level=logging.INFO)
n, status, release = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with claim_gpu(n, poll_s=0.05) as got:
    status.write_text(os.environ["CUDA_VISIBLE_DEVICES"] + "|" + ",".join(got))
    while not release.exists():
        time.sleep(0.05)
"""


class Job:
    """One claimant process; `.device` once it holds its GPUs, `.finish()` to release them."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str], n_gpus: int = 1):
        self.status, self.release = tmp / f"{name}.claimed", tmp / f"{name}.release"
        self.stderr = open(tmp / f"{name}.err", "w+")  # noqa: SIM115 - closed by the `jobs` fixture
        self.proc = subprocess.Popen([sys.executable, "-c", JOB, str(n_gpus), str(self.status), str(self.release)],
                                     env=env, stderr=self.stderr)

    @property
    def device(self) -> str | None:
        if not self.status.exists() or not self.status.read_text():
            return None
        visible, claimed = self.status.read_text().split("|")
        assert visible == claimed  # the job's CUDA_VISIBLE_DEVICES is exactly what it holds
        return claimed

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def finish(self) -> None:
        self.release.touch()
        assert self.proc.wait(timeout=60) == 0, self.log()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll until `condition()` (a bound for a hung test, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(PYTHONPATH=str(ROOT / "workflow"), E2EPATH_GPU_COUNT="2", E2EPATH_GPU_LOCK_DIR=str(tmp_path / "locks"))
    return env


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()
        job.stderr.close()


def test_three_jobs_on_two_gpus_get_distinct_devices_and_the_third_waits(tmp_path, env, jobs):
    first, second = Job(tmp_path, "a", env), Job(tmp_path, "b", env)
    jobs += [first, second]
    wait_for(lambda: first.device and second.device, "two claims")
    assert {first.device, second.device} == {"0", "1"}
    third = Job(tmp_path, "c", env)
    jobs.append(third)
    wait_for(lambda: "busy" in third.log(), "the third job to report that it waits")
    assert third.device is None  # both devices are still held
    freed = first.device
    first.finish()
    wait_for(lambda: third.device, "the third claim")
    assert third.device == freed
    second.finish()
    third.finish()


def test_a_killed_holder_releases_its_device(tmp_path, env, jobs):
    env["E2EPATH_GPU_COUNT"] = "1"
    holder = Job(tmp_path, "holder", env)
    jobs.append(holder)
    wait_for(lambda: holder.device, "the holder's claim")
    waiter = Job(tmp_path, "waiter", env)
    jobs.append(waiter)
    wait_for(lambda: "busy" in waiter.log(), "the waiter to wait")
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    wait_for(lambda: waiter.device, "the waiter's claim after the kill")
    assert waiter.device == "0"
    waiter.finish()


def test_a_job_waiting_for_two_gpus_holds_none_meanwhile(tmp_path, env, jobs):
    one = Job(tmp_path, "one", env)
    jobs.append(one)
    wait_for(lambda: one.device, "the first claim")
    pair = Job(tmp_path, "pair", env, n_gpus=2)
    jobs.append(pair)
    wait_for(lambda: "busy" in pair.log(), "the 2-GPU job to wait")
    other = Job(tmp_path, "other", env)  # the free device must still be claimable
    jobs.append(other)
    wait_for(lambda: other.device, "a claim of the device left free")
    assert {one.device, other.device} == {"0", "1"}
    one.finish()
    other.finish()
    wait_for(lambda: pair.device, "the 2-GPU claim")
    assert pair.device == "0,1"
    pair.finish()


def test_slurm_devices_are_honoured_and_locked_per_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EPATH_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("E2EPATH_GPU_COUNT", "8")  # ignored: SLURM already chose
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with claim_gpu(1) as got:
        assert got == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        assert (tmp_path / "slurm-123" / "gpu5.lock").exists()
    with pytest.raises(RuntimeError, match="asks for 2 GPUs"), claim_gpu(2):
        pass


def test_no_gpu_asked_or_none_visible_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EPATH_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with claim_gpu(1) as got:
        assert got == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("E2EPATH_GPU_COUNT", "2")
    with claim_gpu(0) as got:
        assert got == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert candidate_devices() == ["0", "1"]
    monkeypatch.setenv("E2EPATH_GPU_COUNT", "two")
    with pytest.raises(ValueError, match="E2EPATH_GPU_COUNT"):
        candidate_devices()
