"""Bad input over real HTTP: malformed files, NaNs and wrong dims are 422 naming the problem; big bodies 413.

The 413 checks speak raw HTTP/1.1 on a socket, so they can prove the API answers before the body
is complete: the socket never sends the rest, and the answer still comes.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest
from redis import Redis
from rq import Queue
from safetensors.numpy import save as safetensors_save

from oal_synth.api.app import create_app
from oal_synth.store import EmbeddingSetStore
from tests.reliability.conftest import reset_settings
from tests.utils.live_server import LiveServer, embedding_set_bytes, write_described_generator

pytestmark = pytest.mark.redis

SPACE = "test/space-v1"
DIM = 8
BODY_LIMIT = 4096
RAW = {"content-type": "application/octet-stream"}


@pytest.fixture
def settings(oal_env, redis_conn, monkeypatch):
    monkeypatch.setenv("OAL_MAX_BODY_BYTES", str(BODY_LIMIT))
    settings = reset_settings()
    write_described_generator(settings.generator_root, "test-gen", "embedded", SPACE, DIM)
    return settings


@pytest.fixture
def server(settings):
    with LiveServer(create_app(settings)) as server:
        yield server


def safetensors_set(embeddings: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    labels = np.arange(embeddings.shape[0], dtype=np.int64) % 2 if labels is None else labels
    metadata = {"schema_version": "1", "space": SPACE, "class_names": json.dumps(["a", "b"]), "source": "tests"}
    return safetensors_save({"embeddings": embeddings, "labels": labels}, metadata=metadata)


GOOD = safetensors_set(np.ones((4, DIM), np.float32))
HEADER_LENGTH = struct.unpack("<Q", GOOD[:8])[0]

# (id, file bytes, words the 422 message must hold)
MALFORMED_FILES = [
    ("empty-file", b"", "empty"),
    ("truncated-in-header", GOOD[: 8 + HEADER_LENGTH // 2], "safetensors"),
    ("truncated-in-data", GOOD[:-16], "safetensors"),
    ("header-length-beyond-file", struct.pack("<Q", 2**40) + GOOD[8:], "safetensors"),
    ("header-not-json", struct.pack("<Q", 8) + b"{not js}", "safetensors"),
    ("json-instead-of-safetensors", json.dumps({"embeddings": [[1.0] * DIM]}).encode(), "safetensors"),
    ("nan-embeddings", safetensors_set(np.full((4, DIM), np.nan, np.float32)), "non-finite"),
    ("inf-embedding", safetensors_set(np.where(np.eye(4, DIM) > 0, np.inf, 1).astype(np.float32)), "non-finite"),
    ("embeddings-1d", safetensors_set(np.ones(4, np.float32)), "2-D (N, D)"),
    ("embeddings-3d", safetensors_set(np.ones((4, 2, DIM), np.float32)), "2-D (N, D)"),
    ("embeddings-float64", safetensors_set(np.ones((4, DIM), np.float64)), "float32"),
    ("labels-too-few", safetensors_set(np.ones((4, DIM), np.float32), np.zeros(3, np.int64)), "3 labels for 4"),
]


@pytest.mark.parametrize(("data", "words"), [c[1:] for c in MALFORMED_FILES], ids=[c[0] for c in MALFORMED_FILES])
def test_malformed_embedding_set_is_422_naming_the_problem(server, settings, data, words):
    with server.client() as client:
        response = client.post("/v1/embedding-sets", content=data, headers=RAW)
        still_alive = client.get("/healthz").status_code

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "file"
    assert words in error["message"], error["message"]
    assert still_alive == 200
    store_root = EmbeddingSetStore.from_settings(settings).root
    assert not store_root.exists() or not any(store_root.iterdir())  # nothing half-stored


def test_embedding_dim_other_than_the_generators_is_422_naming_both(server, settings, redis_conn: Redis):
    wide = EmbeddingSetStore.from_settings(settings).put_bytes(embedding_set_bytes(SPACE, DIM * 2))
    spec = {"generator": "test-gen", "embeddings": {"set_id": wide["id"]}, "num_outliers": 6}

    with server.client() as client:
        response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "embeddings.set_id"
    assert f"dim {DIM * 2}" in error["message"] and f"expects {DIM}" in error["message"]
    assert Queue(settings.queue_name, connection=redis_conn).count == 0


def test_nan_in_a_job_spec_number_is_422(server):
    # JSON has no NaN, but Python's json (and many clients) write it; the API must refuse it.
    body = (
        '{"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6,'
        ' "sampler": {"sigma": NaN}}'
    )
    with server.client() as client:
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "sampler.sigma"


# ---------------------------------------------------------------------------- oversized bodies


def oversized_spec() -> bytes:
    spec = {"generator": "test-gen", "embeddings": {"set_id": "ab" * 32}, "num_outliers": 6}
    spec["padding"] = "x" * (BODY_LIMIT * 4)
    return json.dumps(spec).encode()


def read_status_line(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and everything received until the headers end (or the server closes)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return int(received.split(b" ", 2)[1]), received


def request_head(headers: str) -> bytes:
    return f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}\r\n".encode()


def test_declared_oversized_job_body_is_413_before_a_byte_of_it_is_sent(server, settings, redis_conn):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(f"Content-Length: {BODY_LIMIT * 1000}\r\n"))  # and no body at all
        status, head = read_status_line(sock)

    assert status == 413, head
    assert Queue(settings.queue_name, connection=redis_conn).count == 0


def test_chunked_oversized_job_body_is_413_before_it_ends(server, settings, redis_conn):
    body = oversized_spec()
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked\r\n"))
        # Just past the limit, in chunks; the terminating zero-size chunk is never sent.
        while sent <= BODY_LIMIT:
            chunk = body[sent : sent + 1000]
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, head = read_status_line(sock)

    assert status == 413, head
    assert sent < len(body)  # the answer came while most of the body was still unsent
    assert Queue(settings.queue_name, connection=redis_conn).count == 0


def test_oversized_job_body_is_413_json_naming_the_limit_with_httpx(server):
    body = oversized_spec()
    with server.client() as client:
        declared = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        chunked = client.post(
            "/v1/jobs", content=iter([body[:1000], body[1000:]]), headers={"content-type": "application/json"}
        )
        healthy = client.get("/healthz").status_code

    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
        assert str(BODY_LIMIT) in response.json()["error"]["message"]
    assert healthy == 200
