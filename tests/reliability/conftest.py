"""Fixtures of the reliability tests: a private Redis the tests may stop, a tiny-random service setup,
and a small real filesystem to fill.

The shared Redis on 6379 is never stopped; a test that takes Redis away starts its own
`redis-server` on a free loopback port and stops only that one. A disk-full test mounts its own
tmpfs (root with mount permission; skipped elsewhere) and fills only that.
"""

from __future__ import annotations

import errno
import gc
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.exceptions
from redis import Redis
from rq import Worker
from rq.worker import WorkerStatus

from oal_shared.settings import Settings, get_settings
from oal_synth.generators.base import GeneratorInfo
from oal_synth.store import EmbeddingSetStore
from tests.utils.live_server import embedding_set_bytes, install_tiny_random, wait_until

REDIS_START_TIMEOUT_S = 10.0
#: Worker settings of the multi-worker fault tests, so heartbeats lapse and maintenance runs in seconds.
FAST_HEARTBEAT_S = 1
FAST_MAINTENANCE_S = 2
FAST_WORKER_OPTIONS = ("--heartbeat", str(FAST_HEARTBEAT_S), "--maintenance", str(FAST_MAINTENANCE_S))
#: A worker process imports torch and diffusers before it listens: seconds, more on a busy machine.
WORKER_START_S = 90
#: Size of the tmpfs a disk-full test fills: room for a few tiny-random shards or a small checkpoint.
SMALL_FS_BYTES = 512 * 1024
FILL_CHUNK_BYTES = 16 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """A `redis-server` of this test alone, on a free loopback port, without persistence.

    `stop()` shuts it down (the data goes with it: `--save ""`), `start()` brings it back on the
    same port, so clients that keep the URL see an outage and a recovery.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.pidfile = self.workdir / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=REDIS_START_TIMEOUT_S)
        wait_until(self.answers, timeout=REDIS_START_TIMEOUT_S, what=f"private Redis on port {self.port}")

    def answers(self) -> bool:
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, retry=None)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then wait until the port is closed (the pid file may outlive the process)."""
        if not port_is_open(self.port):
            return
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, retry=None)
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        wait_until(lambda: not port_is_open(self.port), timeout=REDIS_START_TIMEOUT_S, what="private Redis to stop")


@pytest.fixture
def private_redis(tmp_path: Path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class PrivateQueue:
    """Settings and a connection for a queue on a private Redis (OAL_REDIS_URL points there)."""

    settings: Settings
    connection: Redis
    redis: PrivateRedis


@pytest.fixture
def private_queue(oal_env, private_redis, monkeypatch):
    monkeypatch.setenv("OAL_REDIS_URL", private_redis.url)
    connection = Redis.from_url(private_redis.url)
    try:
        yield PrivateQueue(settings=reset_settings(), connection=connection, redis=private_redis)
    finally:
        connection.close()


def idle_workers(connection: Redis) -> dict[str, int]:
    """name -> pid of every registered worker whose state is idle."""
    return {w.name: w.pid for w in Worker.all(connection=connection) if w.get_state() == WorkerStatus.IDLE}


def pid_of_worker(connection: Redis, worker_name: str) -> int:
    return Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=connection).pid


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A real tmpfs of SMALL_FS_BYTES mounted on a fresh folder, unmounted afterwards."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES},mode=0755", "tmpfs", str(mount_point)]
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here; the disk-full tests mount a small tmpfs to fill")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs ({result.stderr.strip() or 'mount failed'}); "
            "the disk-full tests need root with mount permission"
        )
    try:
        yield mount_point
    finally:
        gc.collect()  # a failed writer's file object may still hold the mount busy
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30, check=False)
        if unmounted.returncode != 0:  # detach now; the kernel frees it once the last file closes
            subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, timeout=30, check=False)


def fill_filesystem(folder: Path) -> Path:
    """Write a filler file in `folder` until the filesystem refuses (ENOSPC); returns the filler."""
    filler = folder / "filler.bin"
    chunk = b"\0" * FILL_CHUNK_BYTES
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush at close
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


@dataclass
class TinyService:
    """What a job against the real tiny-random pipeline needs: settings, its info, an uploaded set."""

    settings: Settings
    info: GeneratorInfo
    set_id: str


def tiny_job_spec(set_id: str, num_outliers: int = 6, seed: int = 1, generator: str = "tiny-random") -> dict:
    """A job that takes about a second with tiny-random: few outliers, 2 steps, small sampler."""
    return {
        "generator": generator,
        "embeddings": {"set_id": set_id},
        "num_outliers": num_outliers,
        "seed": seed,
        "sampler": {"k": 5, "select": 3, "n_candidates": 8, "keep": 2},
        "diffusion": {"steps": 2, "batch_size": 3, "guidance_scale": 2.0},
        "shards": {"max_samples": num_outliers},
    }


def prepare_tiny_service(settings: Settings, cache_dir: Path) -> TinyService:
    info = install_tiny_random(settings.generator_root, cache_dir)
    data = embedding_set_bytes(info.space, info.embed_dim, per_class=8)
    set_id = EmbeddingSetStore.from_settings(settings).put_bytes(data)["id"]
    return TinyService(settings=settings, info=info, set_id=set_id)


@pytest.fixture
def tiny_service(oal_env, tmp_path_factory) -> TinyService:
    return prepare_tiny_service(oal_env, tmp_path_factory.getbasetemp() / "tiny-random-cache")


def wait_for_job_end(client, job_id: str, timeout: float) -> dict:
    ends = {"finished", "failed", "canceled", "stopped"}
    return wait_until(
        lambda: (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ends and job,
        timeout=timeout,
        interval=0.1,
        what=f"job {job_id} to end",
    )


def reset_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
