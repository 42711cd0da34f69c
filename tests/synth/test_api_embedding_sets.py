"""POST/GET /v1/embedding-sets over real HTTP: raw and multipart uploads, validation, the body limit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from oal_shared.embeddings import embedding_set_from_bytes
from oal_shared.settings import get_settings
from oal_synth.api.app import create_app
from tests.utils.live_server import ID_CLASS_NAMES, LiveServer, embedding_set_bytes

SPACE = "test/space-v1"
BODY_LIMIT = 4096


@pytest.fixture
def client(oal_env, monkeypatch):
    monkeypatch.setenv("OAL_MAX_BODY_BYTES", str(BODY_LIMIT))
    get_settings.cache_clear()
    with LiveServer(create_app(get_settings())) as server, server.client() as client:
        yield client


def test_raw_upload_is_stored_by_content_id(client, oal_env):
    data = embedding_set_bytes(SPACE, dim=8, per_class=3)

    response = client.post("/v1/embedding-sets", content=data, headers={"content-type": "application/octet-stream"})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == embedding_set_from_bytes(data).content_id()
    assert (body["space"], body["dim"], body["count"]) == (SPACE, 8, 18)
    assert body["classes"] == list(ID_CLASS_NAMES) and body["class_counts"] == [3] * 6
    assert response.headers["location"] == f"/v1/embedding-sets/{body['id']}"
    stored = oal_env.artifact_dir / "embedding-sets" / f"{body['id']}.safetensors"
    assert stored.read_bytes() == data

    read = client.get(f"/v1/embedding-sets/{body['id']}")
    assert read.status_code == 200
    assert {k: read.json()[k] for k in ("id", "space", "dim", "count")} == {
        k: body[k] for k in ("id", "space", "dim", "count")
    }


def test_multipart_upload_gives_the_same_id_and_a_repeat_is_200(client):
    data = embedding_set_bytes(SPACE, dim=8, per_class=3)

    first = client.post("/v1/embedding-sets", files={"file": ("set.safetensors", data, "application/octet-stream")})
    repeat = client.post("/v1/embedding-sets", content=data, headers={"content-type": "application/octet-stream"})

    assert first.status_code == 201 and first.json()["created"] is True
    assert repeat.status_code == 200 and repeat.json()["created"] is False
    assert repeat.json()["id"] == first.json()["id"]


def _safetensors(tensors: dict, metadata: dict) -> bytes:
    return safetensors_save(tensors, metadata=metadata)


GOOD_META = {"schema_version": "1", "space": SPACE, "class_names": json.dumps(["a", "b"]), "source": "t"}
GOOD_TENSORS = {"embeddings": np.ones((4, 8), np.float32), "labels": np.array([0, 1, 0, 1], np.int64)}

BAD_FILES = [
    ("not-safetensors", b"\x00" * 64, "not a readable safetensors"),
    ("labels-missing", _safetensors({"embeddings": GOOD_TENSORS["embeddings"]}, GOOD_META), "'labels'"),
    ("space-missing", _safetensors(GOOD_TENSORS, {k: v for k, v in GOOD_META.items() if k != "space"}), "'space'"),
    ("source-missing", _safetensors(GOOD_TENSORS, {k: v for k, v in GOOD_META.items() if k != "source"}), "'source'"),
    ("schema-version-2", _safetensors(GOOD_TENSORS, {**GOOD_META, "schema_version": "2"}), "schema_version is '2'"),
    (
        "label-out-of-range",
        _safetensors({**GOOD_TENSORS, "labels": np.array([0, 1, 2, 1], np.int64)}, GOOD_META),
        "labels",
    ),
    (
        "non-finite",
        _safetensors({**GOOD_TENSORS, "embeddings": np.full((4, 8), np.nan, np.float32)}, GOOD_META),
        "non-finite",
    ),
]


@pytest.mark.parametrize(("data", "words"), [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_invalid_set_is_422_naming_the_problem(client, oal_env, data, words):
    response = client.post("/v1/embedding-sets", content=data, headers={"content-type": "application/octet-stream"})

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "file"
    assert words in error["message"]
    assert not (oal_env.artifact_dir / "embedding-sets").exists() or not any(
        (oal_env.artifact_dir / "embedding-sets").iterdir()
    )


def test_upload_of_the_readmes_contract_without_schema_version_is_stored_as_version_1(client, oal_env):
    # README: tensors embeddings and labels; metadata space, class_names, source (schema_version optional).
    meta = {k: v for k, v in GOOD_META.items() if k != "schema_version"}
    without = _safetensors(GOOD_TENSORS, meta)

    response = client.post("/v1/embedding-sets", content=without, headers={"content-type": "application/octet-stream"})

    assert response.status_code == 201, response.text
    assert response.json()["id"] == embedding_set_from_bytes(_safetensors(GOOD_TENSORS, GOOD_META)).content_id()
    stored = oal_env.artifact_dir / "embedding-sets" / f"{response.json()['id']}.safetensors"
    assert embedding_set_from_bytes(stored.read_bytes()).class_names == ("a", "b")
    assert not [p.name for p in stored.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_multipart_without_file_field_is_422(client):
    response = client.post("/v1/embedding-sets", files={"other": ("x", b"123", "application/octet-stream")})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "file"


def test_unsupported_content_type_is_415(client):
    response = client.post("/v1/embedding-sets", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415
    assert "application/octet-stream" in response.json()["error"]["message"]


def test_oversized_body_is_413_declared_or_streamed(client):
    too_big = b"\x00" * (BODY_LIMIT + 1)

    declared = client.post("/v1/embedding-sets", content=too_big, headers={"content-type": "application/octet-stream"})
    # An iterator body goes out chunked, without Content-Length: the limit counts streamed bytes.
    streamed = client.post(
        "/v1/embedding-sets",
        content=iter([too_big[:2000], too_big[2000:]]),
        headers={"content-type": "application/octet-stream"},
    )
    multipart = client.post("/v1/embedding-sets", files={"file": ("big", too_big, "application/octet-stream")})

    for response in (declared, streamed, multipart):
        assert response.status_code == 413, response.text
        assert str(BODY_LIMIT) in response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("set_id", ["ab" * 32, "../../etc"])
def test_unknown_set_is_404(client, set_id):
    response = client.get(f"/v1/embedding-sets/{set_id}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
