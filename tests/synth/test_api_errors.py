"""Errors are JSON, always, with a request id: unexpected exceptions, Redis refusing us, Redis erroring.

Real HTTP (uvicorn on a loopback port), a real Redis, and for the refusals a real `redis-server`
with a password on a free port. Every answer carries `X-Request-ID`; the body of an error repeats
it, and the server's log has the traceback under the same id.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from fastapi import Request
from redis import Redis

from oal_shared.settings import get_settings
from oal_synth.api.app import create_app
from oal_synth.api.deps import get_store
from oal_synth.api.request_id import REQUEST_ID_HEADER
from oal_synth.queue import JOB_ID_PATTERN
from tests.reliability.conftest import free_port
from tests.utils.live_server import LiveServer, wait_until, write_described_generator

pytestmark = pytest.mark.redis

JOB = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6}
PASSWORD = "s3cret-redis-password"


def assert_json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers[REQUEST_ID_HEADER]
    return error


@pytest.fixture
def app(oal_env, redis_conn):
    write_described_generator(oal_env.generator_root, "test-gen", "embedded", "test/space-v1", 8)
    return create_app(oal_env)


# ---------------------------------------------------------------------------- request ids


def test_every_answer_has_a_request_id_and_a_sane_client_id_is_kept(app):
    with LiveServer(app) as server, server.client() as client:
        plain = client.get("/healthz")
        kept = client.get("/healthz", headers={REQUEST_ID_HEADER: "trace-42.a:b_c"})
        too_long = client.get("/healthz", headers={REQUEST_ID_HEADER: "x" * 129})
        with_space = client.get("/healthz", headers={REQUEST_ID_HEADER: "a b"})
        not_found = client.get("/v1/jobs/" + "0" * 32, headers={REQUEST_ID_HEADER: "mine-1"})
        invalid = client.post("/v1/jobs", json={**JOB, "num_outliers": True}, headers={REQUEST_ID_HEADER: "mine-2"})

    assert len(plain.headers[REQUEST_ID_HEADER]) == 32
    assert kept.headers[REQUEST_ID_HEADER] == "trace-42.a:b_c"
    for response in (too_long, with_space):
        assert JOB_ID_PATTERN.match(response.headers[REQUEST_ID_HEADER])  # replaced by a fresh uuid4 hex
    assert plain.headers[REQUEST_ID_HEADER] != too_long.headers[REQUEST_ID_HEADER]
    assert assert_json_error(not_found, 404, "not_found")["request_id"] == "mine-1"
    assert assert_json_error(invalid, 422, "invalid_request")["request_id"] == "mine-2"


def test_body_limit_answer_carries_the_request_id(oal_env, redis_conn, monkeypatch):
    monkeypatch.setenv("OAL_MAX_BODY_BYTES", "1024")
    get_settings.cache_clear()
    with LiveServer(create_app(get_settings())) as server, server.client() as client:
        response = client.post("/v1/jobs", content=b"{" + b" " * 2000 + b"}", headers={REQUEST_ID_HEADER: "big-1"})
    assert assert_json_error(response, 413, "body_too_large")["request_id"] == "big-1"


# ---------------------------------------------------------------------------- unexpected exceptions


def test_an_exception_in_a_route_is_json_500_logged_with_the_request_id(app, caplog):
    def explode(request: Request) -> dict:
        raise RuntimeError("the route broke in a way nobody planned for")

    app.add_api_route("/v1/explode", explode)
    with caplog.at_level(logging.ERROR, logger="oal_synth"), LiveServer(app) as server, server.client() as client:
        response = client.get("/v1/explode", headers={REQUEST_ID_HEADER: "boom-1"})
        after = client.get("/healthz")
        metrics = client.get("/metrics").text

    error = assert_json_error(response, 500, "internal_error")
    assert error["request_id"] == "boom-1" and "boom-1" in error["message"]
    assert "nobody planned" not in response.text  # internals stay in the log
    logged = [r for r in caplog.records if "boom-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "nobody planned" in str(logged[0].exc_info[1])
    assert after.status_code == 200
    assert 'oal_http_requests_total{method="GET",route="/v1/explode",status="500"} 1.0' in metrics


def test_a_failing_dependency_is_json_500(app):
    def broken_store():
        raise OSError(28, "No space left on device")

    app.dependency_overrides[get_store] = broken_store
    with LiveServer(app) as server, server.client() as client:
        response = client.post("/v1/jobs", json=JOB)
    assert_json_error(response, 500, "internal_error")


# ---------------------------------------------------------------------------- Redis refusing or failing


class PasswordRedis:
    """A `redis-server` of this test alone, with `--requirepass`, the way scripts/ensure-redis.sh starts one."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", PASSWORD],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, timeout=10, what=f"redis-server with a password on port {self.port}")

    def url(self, password: str | None) -> str:
        return f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            return bool(Redis.from_url(self.url(PASSWORD), socket_connect_timeout=0.5).ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def password_redis(tmp_path):
    server = PasswordRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("password", [None, "wrong-password"], ids=["no-password", "wrong-password"])
def test_redis_refusing_our_credentials_is_json_503_not_an_outage(oal_env, password_redis, monkeypatch, password):
    monkeypatch.setenv("OAL_REDIS_URL", password_redis.url(password))
    get_settings.cache_clear()
    settings = get_settings()
    write_described_generator(settings.generator_root, "test-gen", "embedded", "test/space-v1", 8)

    with LiveServer(create_app(settings)) as server, server.client() as client:
        answers = {
            "submit": client.post("/v1/jobs", json=JOB),
            "read": client.get("/v1/jobs/" + "0" * 32),
            "ready": client.get("/readyz"),
        }
        metrics = client.get("/metrics")

    for name, response in answers.items():
        error = assert_json_error(response, 503, "queue_refused")
        assert f"127.0.0.1:{password_redis.port}" in error["message"], name
        assert "OAL_REDIS_URL" in error["message"] and "unreachable" not in error["message"]
        assert "wrong-password" not in response.text
    assert metrics.status_code == 200 and "oal_redis_up 0.0" in metrics.text


def test_a_redis_error_answer_is_json_500_logged_with_the_request_id(app, redis_conn, caplog):
    job_id = "f" * 32
    redis_conn.set(f"rq:job:{job_id}", "not a hash")  # every read of this job answers WRONGTYPE

    with caplog.at_level(logging.ERROR, logger="oal_synth"), LiveServer(app) as server, server.client() as client:
        response = client.get(f"/v1/jobs/{job_id}", headers={REQUEST_ID_HEADER: "wrongtype-1"})

    error = assert_json_error(response, 500, "queue_error")
    assert "ResponseError" in error["message"] and "wrongtype-1" in error["message"]
    logged = [r for r in caplog.records if "wrongtype-1" in r.getMessage()]
    assert logged and "WRONGTYPE" in str(logged[0].exc_info[1])
