"""Fixtures of the reliability tests: a private Redis the tests may stop, and a tiny-random service setup.

The shared Redis on 6379 is never stopped; a test that takes Redis away starts its own
`redis-server` on a free loopback port and stops only that one.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.exceptions
from redis import Redis

from oal_shared.settings import Settings, get_settings
from oal_synth.generators.base import GeneratorInfo
from oal_synth.store import EmbeddingSetStore
from tests.utils.live_server import embedding_set_bytes, install_tiny_random, wait_until

REDIS_START_TIMEOUT_S = 10.0


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
