"""The demo's synthesis step: an API server and a worker as real processes, one job over REST."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx

TERMINAL = {"finished", "failed", "canceled", "stopped"}


@contextmanager
def background(name: str, argv: list[str], env: dict[str, str], log_dir: Path, log: Callable[[str], None]):
    """Runs a service process for the duration of the block; its output goes to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as handle:  # this run's output only
        # Its own session: the demo stops it (and anything it forked) as a group, Ctrl-C or not.
        proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log(f"started {name} (pid {proc.pid}), log: {log_path}")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log(f"stopped {name}")


def wait_ready(base_url: str, proc: subprocess.Popen, stop: threading.Event, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API process exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if stop.wait(0.3):
            raise RuntimeError("stopped")
    raise RuntimeError(f"the API at {base_url} was not ready after {timeout_s:.0f} s")


def submit_and_follow(
    base_url: str, spec: dict, stop: threading.Event, on_progress: Callable[[int, int | None], None]
) -> dict:
    """Submits the job and polls it to the end; on_progress(done, total) after each poll."""
    response = httpx.post(f"{base_url}/v1/jobs", json=spec, timeout=30)
    if response.status_code != 202:
        raise RuntimeError(f"job refused ({response.status_code}): {response.text}")
    job = response.json()
    while job["status"] not in TERMINAL:
        if stop.wait(1.0):
            httpx.delete(f"{base_url}/v1/jobs/{job['id']}", timeout=10)
            raise RuntimeError("stopped")
        job = httpx.get(f"{base_url}/v1/jobs/{job['id']}", timeout=30).json()
        on_progress(job["progress"]["done"], job["progress"]["total"])
    if job["status"] != "finished":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    return job
