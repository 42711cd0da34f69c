"""Security: outputs stay under the shard root, generators come only from the generator root, no pickles.

Path attacks are tried where they enter: the HTTP API, the job itself (run as the worker runs it),
and the generator registry the worker loads through. Symlinks are real symlinks to a folder
outside the root that holds something worth stealing or a model worth planting.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rq.job import JobStatus

from oal_shared.errors import UnsafePathError
from oal_synth.api.app import create_app
from oal_synth.generators.registry import GeneratorNotFoundError, list_generators, resolve_generator_path
from oal_synth.queue import fetch_job
from oal_synth.store import EmbeddingSetStore
from tests.reliability.pickle_audit import audit_source, audit_tree
from tests.utils.live_server import LiveServer, embedding_set_bytes, write_described_generator

REPO = Path(__file__).resolve().parents[2]
SPACE = "test/space-v1"
DIM = 8
SECRET = "top-secret-manifest-outside-the-shard-root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside every root of the service."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def api(oal_env, redis_conn):
    write_described_generator(oal_env.generator_root, "test-gen", "embedded", SPACE, DIM)
    set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes(SPACE, DIM))["id"]
    with LiveServer(create_app(oal_env)) as server, server.client() as client:
        yield client, set_id


def job_spec(set_id: str, generator: str = "test-gen") -> dict:
    return {"generator": generator, "embeddings": {"set_id": set_id}, "num_outliers": 6}


# ---------------------------------------------------------------------------- outputs under the shard root


@pytest.mark.redis
@pytest.mark.parametrize("job_id", ["..", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a" * 30 + "..", "." * 32])
def test_job_ids_that_are_paths_are_unknown_jobs(api, job_id):
    client, _ = api
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/manifest"):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)


@pytest.mark.parametrize("job_id", ["../escape", "a/../../escape", "/tmp/escape", "nested/../.."])
def test_job_refuses_an_output_dir_outside_the_shard_root(oal_env, job_id):
    from oal_synth.synthesis import run_synthesis_job

    with pytest.raises(UnsafePathError):
        run_synthesis_job(job_spec("ab" * 32), job_id=job_id)
    assert not (oal_env.shard_root.parent / "escape").exists()
    assert not Path("/tmp/escape").exists()


def test_job_refuses_a_shard_dir_that_is_a_symlink_out_of_the_root(oal_env, outside):
    from oal_synth.synthesis import run_synthesis_job

    job_id = "0123456789abcdef" * 2
    oal_env.shard_root.mkdir(parents=True)
    (oal_env.shard_root / job_id).symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafePathError, match="outside"):
        run_synthesis_job(job_spec("ab" * 32), job_id=job_id)
    assert list(outside.iterdir()) == []  # not a byte written through the link


@pytest.mark.redis
def test_manifest_behind_a_symlink_out_of_the_root_is_not_served(api, oal_env, redis_conn, outside):
    client, set_id = api
    job_id = client.post("/v1/jobs", json=job_spec(set_id)).json()["id"]
    fetch_job(redis_conn, job_id).set_status(JobStatus.FINISHED)  # as if a worker had finished it
    (outside / "manifest.json").write_text(json.dumps({"schema_version": 1, "secret": SECRET}))
    oal_env.shard_root.mkdir(parents=True)
    (oal_env.shard_root / job_id).symlink_to(outside, target_is_directory=True)

    response = client.get(f"/v1/jobs/{job_id}/manifest")

    assert 400 <= response.status_code < 500, response.text
    assert SECRET not in response.text
    assert "outside" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------- generators from the allow-listed root


def plant_generator(folder: Path, generator_id: str) -> Path:
    """A folder that looks like a generator (model_index.json and oal_generator.json)."""
    write_described_generator(folder.parent, folder.name, "embedded", SPACE, DIM)
    info = json.loads((folder / "oal_generator.json").read_text())
    (folder / "oal_generator.json").write_text(json.dumps({**info, "id": generator_id}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.mark.redis
@pytest.mark.parametrize(
    "generator",
    ["../outside", "../../etc", "/etc", "/tmp/planted", "ok/../../outside", "ok/..", "..", "./../outside"],
)
def test_generator_names_that_leave_the_root_are_422(api, generator):
    client, set_id = api
    response = client.post("/v1/jobs", json=job_spec(set_id, generator=generator))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "generator"


@pytest.mark.redis
@pytest.mark.parametrize("link", ["planted", "org/planted"])
def test_generator_symlinked_out_of_the_root_is_refused(api, oal_env, outside, link):
    client, set_id = api
    plant_generator(outside / "model", generator_id="planted-id")
    link_path = Path(oal_env.generator_root) / link
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(outside / "model", target_is_directory=True)

    by_folder = client.post("/v1/jobs", json=job_spec(set_id, generator=link))
    by_id = client.post("/v1/jobs", json=job_spec(set_id, generator="planted-id"))
    listed = [g["id"] for g in client.get("/v1/generators").json()["generators"]]

    for response in (by_folder, by_id):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "generator"
    assert "outside" in by_folder.json()["error"]["message"]
    assert "planted-id" not in listed
    # The worker resolves through the same registry before it loads anything.
    for name in (link, "planted-id"):
        with pytest.raises(GeneratorNotFoundError):
            resolve_generator_path(name, oal_env)
    assert "planted-id" not in [info.id for info in list_generators(oal_env)]


def test_generator_folder_inside_the_root_still_resolves(oal_env):
    """The control for the tests above: a real folder under the root is found by id and by name."""
    folder = plant_generator(Path(oal_env.generator_root) / "org" / "model", generator_id="inside-id")
    assert resolve_generator_path("inside-id", oal_env) == folder.resolve()
    assert resolve_generator_path("org/model", oal_env) == folder.resolve()
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------- no pickles


SHIPPED_CODE = ("services", "shared", "benchmarks", "scripts", "docker")


def test_no_pickle_is_loaded_anywhere_in_the_shipped_code():
    findings, files = audit_tree(REPO, SHIPPED_CODE)
    assert files > 50  # the audit really read the source tree
    assert not findings, "\n".join(map(str, findings))


def test_rq_objects_of_the_service_use_the_json_serializer(oal_env, redis_conn):
    from rq.serializers import JSONSerializer

    from oal_synth.queue import synthesis_queue
    from oal_synth.worker import SynthesisWorker

    queue = synthesis_queue(redis_conn, oal_env)
    worker = SynthesisWorker([queue], connection=redis_conn)
    assert queue.serializer is JSONSerializer
    assert worker.serializer is JSONSerializer  # no `serializer=` at the call site: the class sets it


PICKLING_SOURCE = """
import pickle
import joblib
import numpy as np
import torch
import webdataset as wds
from diffusers import UNet2DConditionModel
from rq import Queue
from rq.job import Job

pickle.loads(b"")
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
np.load("a.npy")
np.load("a.npy", allow_pickle=True)
np.lib.format.read_array(handle)
UNet2DConditionModel.from_pretrained("folder")
Queue("q", connection=redis)
Job.fetch("id", connection=redis)
wds.WebDataset("s.tar").decode()
"""

SAFE_SOURCE = """
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

torch.load("w.pt", weights_only=True)
np.load("a.npy", allow_pickle=False)
np.lib.format.read_array(handle, allow_pickle=False)
UNet2DConditionModel.from_pretrained("folder", use_safetensors=True)
MyModel.from_pretrained("folder")
Queue("q", connection=redis, serializer=JSONSerializer)
Job.fetch("id", connection=redis, serializer=JSONSerializer)
"""


def test_the_pickle_audit_catches_each_pattern_and_passes_safe_code():
    findings = [f.what for f in audit_source(PICKLING_SOURCE)]

    expected = [
        "imports pickle",
        "imports joblib",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "np.load without allow_pickle=False",
        "np.load without allow_pickle=False",
        "np.lib.format.read_array without allow_pickle=False",
        "UNet2DConditionModel.from_pretrained without use_safetensors=True",
        "Queue without serializer=",
        "Job.fetch without serializer=",
        "WebDataset(...).decode",
    ]
    assert len(findings) == len(expected), findings
    for found, words in zip(findings, expected, strict=True):
        assert found.startswith(words), (found, words)
    assert audit_source(SAFE_SOURCE) == []
