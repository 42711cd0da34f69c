"""Real HTTP for tests: the API under uvicorn on a free loopback port, and worker subprocesses.

`LiveServer(app)` runs uvicorn in a thread of the test process (fast: no new interpreter), bound
to port 0 so the OS picks a free port and no two tests race for one. `worker_process(...)` starts
`oal-synth worker` as a real subprocess with the test's `OAL_*` environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

STARTUP_TIMEOUT_S = 15.0


class LiveServer:
    """Context manager: `with LiveServer(app) as server: httpx.get(server.url + "/healthz")`."""

    def __init__(self, app, host: str = "127.0.0.1"):
        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.host = host
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see the log above)")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; returns it, or fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "oal_synth.cli", "worker", *args]


@contextmanager
def worker_process(*args: str, log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`oal-synth worker ARGS` in its own process group; killed (SIGKILL) on exit if still running."""
    environment = {**os.environ, "OAL_TORCH_THREADS": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            worker_command(*args),
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------- what a job needs

ID_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")
_tiny_random_cache: dict[str, Path] = {}


def write_described_generator(root: Path, generator_id: str, kind: str, space: str, embed_dim: int) -> Path:
    """A generator folder holding only `oal_generator.json`: enough for the API, which never loads weights."""
    from oal_synth.generators.base import GeneratorInfo
    from oal_synth.generators.files import write_generator_info

    folder = Path(root) / generator_id
    folder.mkdir(parents=True, exist_ok=True)
    info = GeneratorInfo(
        id=generator_id,
        kind=kind,
        space=space,
        embed_dim=embed_dim,
        latent_shape=(4, 8, 8),
        scaling_factor=1.0,
        content_hash="0" * 64,
        class_names=ID_CLASS_NAMES,
        description="described only (API tests)",
    )
    write_generator_info(folder, info)
    return folder


def install_tiny_random(root: Path, cache_dir: Path):
    """Put the real tiny-random pipeline under `root/tiny-random`; built once per test session.

    Returns its GeneratorInfo (the space an embedding set must carry to be used with it).
    """
    from oal_synth.generators.files import read_generator_info
    from oal_synth.generators.tiny_random import build_tiny_random_pipeline

    if "folder" not in _tiny_random_cache:
        _tiny_random_cache["folder"] = build_tiny_random_pipeline(Path(cache_dir) / "tiny-random")
    target = Path(root) / "tiny-random"
    if not target.exists():
        shutil.copytree(_tiny_random_cache["folder"], target)
    return read_generator_info(target)


def embedding_set_bytes(
    space: str, dim: int, per_class: int = 10, class_names: tuple[str, ...] = ID_CLASS_NAMES, seed: int = 0
) -> bytes:
    """A valid safetensors embedding set: `per_class` Gaussian vectors per class, in `space`."""
    import numpy as np

    from oal_shared.embeddings import EmbeddingSet, embedding_set_to_bytes

    rng = np.random.default_rng(seed)
    count = per_class * len(class_names)
    es = EmbeddingSet(
        embeddings=rng.standard_normal((count, dim)).astype(np.float32),
        labels=np.repeat(np.arange(len(class_names)), per_class).astype(np.int64),
        space=space,
        class_names=class_names,
        source=f"tests: {per_class} Gaussian vectors per class, seed {seed}",
    )
    return embedding_set_to_bytes(es)


def run_burst_worker(settings, heartbeat_s: int = 1) -> bool:
    """`oal-synth worker --burst` in this process (fast when torch and diffusers are loaded already).

    Runs with one torch thread. RQ installs SIGINT/SIGTERM handlers for its warm shutdown; they
    and the thread count are put back afterwards, so the rest of the pytest session is unchanged.
    """
    import torch

    from oal_synth.worker import run_worker

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    # One torch thread: on a shared 2-core machine more threads spin against each other.
    settings = settings.model_copy(update={"torch_threads": 1})
    try:
        return run_worker(settings, burst=True, heartbeat_s=heartbeat_s)
    finally:
        torch.set_num_threads(threads)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
