"""A job's `embeddings.benchmark` as a benchmark file: checked at the door (422), embedded by the worker."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from oal_shared.errors import ConfigError
from oal_shared.settings import Settings, get_settings
from oal_synth.api.app import create_app
from oal_synth.generators.embedded import EmbeddedGenerator
from oal_synth.spec import EmbeddingsFromBenchmark, JobSpec
from oal_synth.synthesis import embed_benchmark
from oal_synth.validation import spec_problems
from tests.utils.folder_benchmark import CLASS_NAMES, write_folder_benchmark
from tests.utils.live_server import LiveServer, write_described_generator
from tests.utils.tiny_sd import smoke_generator_folder

GENERATOR = "test-gen"


def job(benchmark: str) -> dict:
    return {
        "generator": GENERATOR,
        "embeddings": {"benchmark": benchmark, "per_class": 4},
        "num_outliers": 6,
        "diffusion": {"steps": 2, "batch_size": 2},
    }


def test_the_spec_takes_a_relative_benchmark_file_only():
    assert JobSpec.model_validate(job("mine/bench.toml")).embeddings.benchmark == "mine/bench.toml"
    for value, words in (
        ("../up/bench.toml", "without '..'"),
        ("/abs/bench.json", "relative to the data root"),
        ("imagenet", "fmnist-osr"),
    ):
        with pytest.raises(ValueError) as caught:
            JobSpec.model_validate(job(value))
        (problem,) = spec_problems(caught.value.errors())
        assert problem.field == "embeddings.benchmark" and words in problem.message


@pytest.fixture
def api(oal_env, redis_conn, monkeypatch, tmp_path):
    data_dir = tmp_path / "data"
    monkeypatch.setenv("OAL_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    settings = get_settings()
    write_described_generator(settings.generator_root, GENERATOR, "embedded", "test/space-v1", 8)
    write_folder_benchmark(data_dir, size=28, channels=1)
    write_folder_benchmark(data_dir, folder="escapes", extra={"far": [{"folder": "../outside"}]})
    (tmp_path / "outside").mkdir()
    with LiveServer(create_app(settings)) as server, server.client() as client:
        yield client, data_dir


@pytest.mark.redis
def test_the_api_checks_the_benchmark_file_at_the_door(api):
    client, data_dir = api
    accepted = client.post("/v1/jobs", json=job("shapes.toml"))
    assert accepted.status_code == 202, accepted.text
    for value, words in (
        ("missing.toml", f"benchmark file missing.toml does not exist (looked at {data_dir.resolve()}/missing.toml)"),
        ("escapes.toml", "far[0].folder: path part '../outside'"),
    ):
        response = client.post("/v1/jobs", json=job(value))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "embeddings.benchmark" and words in error["message"], error


def test_the_api_process_reads_the_benchmark_file_without_torch(tmp_path):
    write_folder_benchmark(tmp_path, size=28, channels=1)
    script = (
        "import sys; from pathlib import Path; from oal_shared.settings import Settings; "
        "from oal_synth.validation import EmbeddingsSummary; "
        f"s = EmbeddingsSummary.for_benchmark('shapes.toml', Settings(data_dir=Path({str(tmp_path)!r}))); "
        "print(s.class_names, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{CLASS_NAMES} False"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> EmbeddedGenerator:
    return EmbeddedGenerator.from_pretrained(smoke_generator_folder(tmp_path_factory.getbasetemp()), device="cpu")


def test_the_worker_embeds_the_files_it_names(embedded, tmp_path):
    settings = Settings(data_dir=tmp_path)
    write_folder_benchmark(tmp_path, size=28, channels=1, train_per_class=10)
    source = EmbeddingsFromBenchmark(benchmark="shapes.toml", per_class=4)
    es = embed_benchmark(source, 9, embedded, settings)
    assert es.class_names == CLASS_NAMES and np.bincount(es.labels).tolist() == [4, 4, 4]
    assert es.space == embedded.info.space and "shapes.toml id_train" in es.source
    # Row for row what the generator makes of the decoded images of those classes.
    from oal_shared.data import load_benchmark

    images = load_benchmark("shapes.toml", settings, confined=True).id_train.images
    rng = [np.random.default_rng([9, c]) for c in range(3)]
    rows = [np.sort(rng[c].choice(np.arange(c * 10, c * 10 + 10), 4, replace=False)) for c in range(3)]
    expected = embedded.embed_images(images[np.concatenate(rows)])
    assert torch.allclose(torch.from_numpy(es.embeddings), expected, atol=1e-5)


def test_the_worker_refuses_images_its_generator_cannot_embed(embedded, tmp_path):
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)
    write_folder_benchmark(data_dir, size=16, channels=3)
    with pytest.raises(ConfigError, match=r"embeddings.benchmark: shapes.toml has 16x16 RGB images.*image_size = 28"):
        embed_benchmark(EmbeddingsFromBenchmark(benchmark="shapes.toml", per_class=2), 0, embedded, settings)
    outside = write_folder_benchmark(tmp_path / "elsewhere", size=28, channels=1)
    inside = data_dir / "link.toml"
    inside.symlink_to(outside)
    with pytest.raises(ConfigError, match="embeddings.benchmark: .* outside"):
        embed_benchmark(EmbeddingsFromBenchmark(benchmark="link.toml", per_class=2), 0, embedded, settings)
