"""POST/GET/DELETE /v1/jobs over real HTTP against a real Redis (no worker runs here)."""

from __future__ import annotations

import copy

import pytest
from rq import Queue

from oal_shared.settings import get_settings
from oal_synth.api.app import create_app
from oal_synth.store import EmbeddingSetStore
from tests.utils.live_server import LiveServer, embedding_set_bytes, write_described_generator

pytestmark = pytest.mark.redis

TEST_SPACE = "test/space-v1"
DIM = 8
MAX_STEPS = 100


@pytest.fixture
def api_settings(oal_env, redis_conn, monkeypatch):
    monkeypatch.setenv("OAL_MAX_STEPS", str(MAX_STEPS))
    monkeypatch.setenv("OAL_MAX_OUTLIERS", "1000")
    monkeypatch.setenv("OAL_MAX_SHARD_SAMPLES", "2000")
    get_settings.cache_clear()
    settings = get_settings()
    # Generators described by their oal_generator.json alone: the API never loads weights.
    write_described_generator(settings.generator_root, "test-gen", "embedded", TEST_SPACE, DIM)
    write_described_generator(settings.generator_root, "test-sd", "stable-diffusion", "sd-token:test", DIM)
    return settings


@pytest.fixture
def set_id(api_settings) -> str:
    return EmbeddingSetStore.from_settings(api_settings).put_bytes(embedding_set_bytes(TEST_SPACE, DIM))["id"]


@pytest.fixture
def client(api_settings):
    with LiveServer(create_app(api_settings)) as server, server.client() as client:
        yield client


def good_spec(set_id: str) -> dict:
    return {
        "generator": "test-gen",
        "embeddings": {"set_id": set_id},
        "num_outliers": 12,
        "seed": 3,
        "sampler": {"k": 5, "select": 4, "n_candidates": 20, "keep": 2},
        "diffusion": {"steps": 2, "batch_size": 4},
        "shards": {"max_samples": 5},
    }


def test_submit_job_is_queued_with_location(client, set_id, api_settings, redis_conn):
    response = client.post("/v1/jobs", json=good_spec(set_id))

    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["progress"] == {"done": 0, "total": 12}
    assert job["shards"] == [] and job["error"] is None
    assert job["spec"]["embeddings"] == {"set_id": set_id}
    assert job["spec"]["sampler"]["k"] == 5
    assert Queue(api_settings.queue_name, connection=redis_conn).job_ids == [job["id"]]

    again = client.get(response.headers["location"])
    assert again.status_code == 200
    assert (again.json()["id"], again.json()["status"]) == (job["id"], "queued")


def test_benchmark_embeddings_accepted_for_an_image_generator(client):
    spec = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr", "per_class": 50}, "num_outliers": 6}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["embeddings"] == {"benchmark": "fmnist-osr", "per_class": 50}


def _with(spec: dict, path: str, value) -> dict:
    spec = copy.deepcopy(spec)
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return spec


# (test id, change to the good spec, field the 422 must name, words the message must hold)
BAD_SPECS = [
    ("num-outliers-zero", ("num_outliers", 0), "num_outliers", "greater than or equal to 1"),
    ("num-outliers-over-limit", ("num_outliers", 1001), "num_outliers", "at most 1000"),
    ("steps-over-limit", ("diffusion.steps", MAX_STEPS + 1), "diffusion.steps", f"at most {MAX_STEPS}"),
    ("shard-size-over-limit", ("shards.max_samples", 2001), "shards.max_samples", "at most 2000"),
    ("k-zero", ("sampler.k", 0), "sampler.k", "greater than or equal to 1"),
    ("keep-over-candidates", ("sampler.keep", 50), "sampler", "sampler.keep"),
    ("classes-empty", ("sampler.classes", []), "sampler.classes", "at least one class"),
    ("classes-beyond-set", ("sampler.classes", [0, 6]), "sampler.classes", "6 classes"),
    ("scheduler-unknown", ("diffusion.scheduler", "euler"), "diffusion.scheduler", "ddim"),
    ("guidance-below-one", ("diffusion.guidance_scale", 0.5), "diffusion.guidance_scale", "1"),
    ("latent-dtype", ("shards.latent_dtype", "int8"), "shards.latent_dtype", "float16"),
    ("extra-key", ("colour", "blue"), "colour", "Extra inputs"),
    ("seed-negative", ("seed", -1), "seed", "greater than or equal to 0"),
    ("generator-escapes-root", ("generator", "../etc"), "generator", "'..'"),
    ("generator-unknown", ("generator", "no-such-gen"), "generator", "test-gen"),
    ("set-id-malformed", ("embeddings.set_id", "XYZ"), "embeddings.set_id", "pattern"),
    ("set-id-unknown", ("embeddings.set_id", "ab" * 32), "embeddings.set_id", "POST /v1/embedding-sets"),
    ("embeddings-empty", ("embeddings", {}), "embeddings", "set_id"),
    (
        "per-class-too-small",
        ("embeddings", {"benchmark": "fmnist-osr", "per_class": 1}),
        "embeddings.per_class",
        "greater than or equal to 2",
    ),
    ("benchmark-unknown", ("embeddings", {"benchmark": "imagenet"}), "embeddings.benchmark", "fmnist-osr"),
    ("benchmark-for-sd", ("generator", "test-sd"), "embeddings", "embedding set"),
    ("embeddings-both-sources", ("embeddings.benchmark", "fmnist-osr"), "embeddings", "exactly one of"),
    ("embeddings-not-an-object", ("embeddings", "fmnist-osr"), "embeddings", "set_id"),
    ("set-source-with-benchmark-key", ("embeddings.per_class", 5), "embeddings.per_class", "Extra inputs"),
    # Counts are strict: JSON true is not 1, "5" is not 5, 2.0 is not 2; a flag is not 0/1.
    ("num-outliers-true", ("num_outliers", True), "num_outliers", "valid integer"),
    ("num-outliers-string", ("num_outliers", "12"), "num_outliers", "valid integer"),
    ("num-outliers-float", ("num_outliers", 12.0), "num_outliers", "valid integer"),
    ("seed-true", ("seed", True), "seed", "valid integer"),
    ("k-true", ("sampler.k", True), "sampler.k", "valid integer"),
    ("classes-true", ("sampler.classes", [True]), "sampler.classes.0", "valid integer"),
    ("steps-true", ("diffusion.steps", True), "diffusion.steps", "valid integer"),
    ("batch-size-true", ("diffusion.batch_size", True), "diffusion.batch_size", "valid integer"),
    ("max-samples-true", ("shards.max_samples", True), "shards.max_samples", "valid integer"),
    ("guidance-true", ("diffusion.guidance_scale", True), "diffusion.guidance_scale", "valid number"),
    ("sigma-string", ("sampler.sigma", "0.07"), "sampler.sigma", "valid number"),
    ("knn-bug-flag-one", ("sampler.faithful_knn_bug", 1), "sampler.faithful_knn_bug", "valid boolean"),
]


@pytest.mark.parametrize(("change", "field", "words"), [case[1:] for case in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_answered_422_naming_field(client, set_id, change, field, words, api_settings, redis_conn):
    spec = _with(good_spec(set_id), *change)
    if change[0] == "generator" and change[1] == "test-sd":
        spec["embeddings"] = {"benchmark": "fmnist-osr"}

    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert words in error["message"]
    assert Queue(api_settings.queue_name, connection=redis_conn).count == 0


def test_per_class_true_is_not_a_count(client):
    spec = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr", "per_class": True}, "num_outliers": 6}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "embeddings.per_class"


def test_float_fields_take_integers(client, set_id):
    spec = _with(good_spec(set_id), "diffusion.guidance_scale", 3)
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["diffusion"]["guidance_scale"] == 3.0


def test_every_problem_is_listed_with_the_first_as_field(client, set_id, api_settings, redis_conn):
    spec = _with(_with(good_spec(set_id), "num_outliers", 1001), "sampler.classes", [7])

    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "num_outliers"
    assert [d["field"] for d in error["details"]] == ["num_outliers", "sampler.classes"]
    assert "at most 1000" in error["message"] and "6 classes" in error["message"]
    assert Queue(api_settings.queue_name, connection=redis_conn).count == 0


def test_class_the_benchmark_lacks_is_422_at_submit(client, api_settings, redis_conn):
    # fmnist-osr has 6 ID classes (0..5); before, this was accepted and failed in the worker.
    spec = {
        "generator": "test-gen",
        "embeddings": {"benchmark": "fmnist-osr"},
        "num_outliers": 6,
        "sampler": {"classes": [2, 6]},
    }

    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "sampler.classes"
    assert "[6]" in error["message"] and "benchmark fmnist-osr has 6 classes (0..5)" in error["message"]
    assert Queue(api_settings.queue_name, connection=redis_conn).count == 0


def _set_with_counts(counts: list[int]) -> bytes:
    import numpy as np

    from oal_shared.embeddings import EmbeddingSet, embedding_set_to_bytes

    names = tuple(f"class-{i}" for i in range(len(counts)))
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    vectors = np.random.default_rng(0).standard_normal((labels.size, DIM)).astype(np.float32)
    return embedding_set_to_bytes(EmbeddingSet(vectors, labels, TEST_SPACE, names, "tests: uneven classes"))


@pytest.mark.parametrize(
    ("classes", "field"), [([0, 2], "sampler.classes"), (None, "embeddings.set_id")], ids=["named", "all"]
)
def test_class_with_too_few_embeddings_is_422_at_submit(client, api_settings, redis_conn, classes, field):
    sparse = EmbeddingSetStore.from_settings(api_settings).put_bytes(_set_with_counts([5, 5, 1]))
    spec = _with(good_spec(sparse["id"]), "sampler.classes", classes)

    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert "2 ('class-2': 1)" in error["message"] and "at least 2" in error["message"]
    assert Queue(api_settings.queue_name, connection=redis_conn).count == 0
    # The classes that have enough embeddings are fine.
    assert client.post("/v1/jobs", json=_with(spec, "sampler.classes", [0, 1])).status_code == 202


def test_body_that_is_not_json_is_422(client):
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"].startswith("body")


def test_space_mismatch_refused_naming_both_spaces(client, api_settings):
    other = EmbeddingSetStore.from_settings(api_settings).put_bytes(embedding_set_bytes("other/space-v9", DIM))

    response = client.post("/v1/jobs", json=good_spec(other["id"]))

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "space_mismatch"
    assert error["field"] == "embeddings.set_id"
    assert "other/space-v9" in error["message"] and TEST_SPACE in error["message"]


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job-id"])
def test_unknown_job_is_404(client, job_id):
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/manifest")):
        response = client.request(method, f"/v1/jobs/{job_id}{path}")
        assert response.status_code == 404, (method, path, response.text)
        assert job_id in response.json()["error"]["message"]


def test_cancel_queued_job(client, set_id, api_settings, redis_conn):
    job = client.post("/v1/jobs", json=good_spec(set_id)).json()

    response = client.delete(f"/v1/jobs/{job['id']}")

    assert response.status_code == 202
    assert response.json()["status"] == "canceled"
    assert response.json()["error"]["code"] == "canceled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    assert Queue(api_settings.queue_name, connection=redis_conn).count == 0
    # Cancelling again changes nothing and says so with the same answer.
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"


def test_manifest_is_409_until_finished(client, set_id):
    job = client.post("/v1/jobs", json=good_spec(set_id)).json()

    response = client.get(f"/v1/jobs/{job['id']}/manifest")

    assert response.status_code == 409
    assert "queued" in response.json()["error"]["message"]


def test_too_many_queued_jobs_is_429(api_settings, set_id, monkeypatch):
    monkeypatch.setenv("OAL_MAX_QUEUED_JOBS", "1")
    get_settings.cache_clear()
    with LiveServer(create_app(get_settings())) as server, server.client() as client:
        assert client.post("/v1/jobs", json=good_spec(set_id)).status_code == 202
        response = client.post("/v1/jobs", json=good_spec(set_id))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert "OAL_MAX_QUEUED_JOBS" in response.json()["error"]["message"]


def test_token_guards_post_and_delete_only(api_settings, set_id, monkeypatch):
    monkeypatch.setenv("OAL_API_TOKEN", "s3cret-token-for-tests")
    get_settings.cache_clear()
    with LiveServer(create_app(get_settings())) as server, server.client() as client:
        missing = client.post("/v1/jobs", json=good_spec(set_id))
        wrong = client.post("/v1/jobs", json=good_spec(set_id), headers={"Authorization": "Bearer nope"})
        right = client.post(
            "/v1/jobs", json=good_spec(set_id), headers={"Authorization": "Bearer s3cret-token-for-tests"}
        )
        job_id = right.json()["id"]
        read = client.get(f"/v1/jobs/{job_id}")
        delete_without = client.delete(f"/v1/jobs/{job_id}")
        open_paths = [client.get(path).status_code for path in ("/healthz", "/metrics", "/openapi.json", "/docs")]

    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert right.status_code == 202
    assert read.status_code == 200 and read.json()["status"] == "queued"
    assert delete_without.status_code == 401
    assert open_paths == [200, 200, 200, 200]
