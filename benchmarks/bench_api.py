"""Submit latency of the synthesis API under concurrent clients (POST /v1/jobs over loopback HTTP).

Starts `oal-synth serve` as its own process on a free port, against Redis with a private queue
name and no worker, so every accepted job stays queued; the queue and its jobs are deleted at the
end. Each level runs C clients at once, each sending R submissions back to back, and reports
p50/p95/p99 latency and requests per second. The client and the server share this machine.

    .venv/bin/python benchmarks/bench_api.py                          # 50 and 200 clients, Redis db 15
    .venv/bin/python benchmarks/bench_api.py --clients 10 50 --per-client 20 --json api.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from redis import Redis
from rich.console import Console
from rich.table import Table

from oal_shared.embeddings import EmbeddingSet, embedding_set_to_bytes
from oal_synth.queue import synthesis_queue
from oal_synth.spec import JobSpec

#: Test database by default: the benchmark must never touch a developer's queue in db 0.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
#: tiny-random is listed before it is built; its token embeddings have this many dimensions.
GENERATOR = "tiny-random"
EMBED_DIM = 32
SERVER_START_TIMEOUT_S = 30.0
WARMUP_REQUESTS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, redis_url: str, queue_name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "OAL_REDIS_URL": redis_url,
        "OAL_QUEUE_NAME": queue_name,
        "OAL_SHARD_ROOT": str(workdir / "shards"),
        "OAL_ARTIFACT_DIR": str(workdir / "artifacts"),
        "OAL_GENERATOR_ROOT": str(workdir / "generators"),
        "OAL_MAX_QUEUED_JOBS": str(10**9),  # measure the path to 202, not admission refusals
    }
    env.pop("OAL_API_TOKEN", None)
    command = [sys.executable, "-m", "oal_synth.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(workdir / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen([*command, "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            tail = (workdir / "server.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"the API did not become ready at {url} (is Redis at {redis_url} running?)\n{tail}")
        time.sleep(0.1)


def embedding_set(dim: int) -> bytes:
    rng = np.random.default_rng(0)
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")
    return embedding_set_to_bytes(
        EmbeddingSet(
            embeddings=rng.standard_normal((10 * len(names), dim)).astype(np.float32),
            labels=np.repeat(np.arange(len(names)), 10).astype(np.int64),
            space="bench/space",
            class_names=names,
            source="bench_api: Gaussian vectors",
        )
    )


async def run_level(url: str, spec: dict, clients: int, per_client: int) -> dict:
    """`clients` concurrent clients, each submitting `per_client` jobs one after another."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:

        async def one_client() -> None:
            for _ in range(per_client):
                started = time.perf_counter()
                response = await client.post("/v1/jobs", json=spec)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "accepted": statuses.get(202, 0),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200], help="concurrency levels")
    parser.add_argument("--per-client", type=int, default=10, help="submissions each client sends in turn")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    queue_name = f"oal-bench-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(args.redis_url)
    results = []
    with tempfile.TemporaryDirectory(prefix="oal-bench-api-") as workdir:
        server, url = start_server(Path(workdir), args.redis_url, queue_name)
        try:
            uploaded = httpx.post(
                f"{url}/v1/embedding-sets",
                content=embedding_set(EMBED_DIM),
                headers={"content-type": "application/octet-stream"},
            )
            uploaded.raise_for_status()
            spec = {"generator": GENERATOR, "embeddings": {"set_id": uploaded.json()["id"]}, "num_outliers": 100}
            JobSpec.model_validate(spec)  # fail here, not as 422s in the table
            asyncio.run(run_level(url, spec, clients=1, per_client=WARMUP_REQUESTS))
            for clients in args.clients:
                results.append(asyncio.run(run_level(url, spec, clients, args.per_client)))
        finally:
            server.terminate()
            server.wait(timeout=10)
            queue = synthesis_queue(redis, _settings_for(args.redis_url, queue_name))
            left = queue.count
            queue.delete(delete_jobs=True)
            redis.close()

    table = Table(
        title=f"POST /v1/jobs over loopback, no worker, {os.cpu_count()} CPU cores shared by client and server"
    )
    for column in ("clients", "requests", "202", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["clients"]),
            str(r["requests"]),
            str(r["accepted"]),
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['max_ms']:.0f}",
            f"{r['req_per_s']:.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"queue {queue_name}: {left} queued jobs deleted after the run")
    if args.json:
        args.json.write_text(json.dumps({"per_client": args.per_client, "levels": results}, indent=2))


def _settings_for(redis_url: str, queue_name: str):
    from oal_shared.settings import Settings

    return Settings(redis_url=redis_url, queue_name=queue_name)


if __name__ == "__main__":
    main()
