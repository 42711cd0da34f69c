"""One validation of a job: `validate_job` alone, and the API and the worker refusing in the same words.

The worker side runs the real job function with the real tiny-random pipeline, enqueued past the
API's check (as a client of the queue could), and must fail with the message the API answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oal_shared.errors import ConfigError, SpaceMismatchError
from oal_synth.api.app import create_app
from oal_synth.generators.base import GeneratorInfo
from oal_synth.spec import JobSpec
from oal_synth.store import EmbeddingSetStore
from oal_synth.validation import EmbeddingsSummary, Problem, parse_job_spec, validate_job
from tests.utils.live_server import LiveServer, embedding_set_bytes, install_tiny_random

REPO = Path(__file__).resolve().parents[2]

GENERATOR = GeneratorInfo(
    id="gen",
    kind="embedded",
    space="space/a",
    embed_dim=8,
    latent_shape=(4, 8, 8),
    scaling_factor=1.0,
    content_hash="0" * 64,
)
SET = EmbeddingsSummary(
    name="embedding set abc", class_names=("a", "b", "c"), space="space/a", dim=8, class_counts=(5, 5, 1)
)


def spec(**changes) -> JobSpec:
    body = {"generator": "gen", "embeddings": {"set_id": "ab" * 8}, "num_outliers": 6, **changes}
    return JobSpec.model_validate(body)


def test_a_fitting_job_has_no_problems():
    assert validate_job(spec(sampler={"classes": [0, 1]}), GENERATOR, SET) == []
    # With fewer outliers than classes only the first classes are sampled; the sparse class 2 is not.
    assert validate_job(spec(num_outliers=2), GENERATOR, SET) == []


def test_unknowns_skip_the_checks_that_need_them():
    assert validate_job(spec(sampler={"classes": [5]}), None, None) == []
    unbuilt = GeneratorInfo(**{**GENERATOR.__dict__, "space": ""})  # tiny-random before its first build
    assert validate_job(spec(), unbuilt, EmbeddingsSummary("s", ("a", "b"), space="elsewhere", dim=8)) == []
    assert [p.field for p in validate_job(spec(), unbuilt, EmbeddingsSummary("s", ("a",), "x", 16))] == [
        "embeddings.set_id"
    ]


def test_each_problem_names_its_field():
    other_space = EmbeddingsSummary("embedding set abc", ("a", "b"), space="space/b", dim=8)
    assert validate_job(spec(), GENERATOR, other_space) == [
        Problem(
            "embeddings.set_id",
            "embedding set abc lives in space 'space/b', but generator 'gen' is conditioned on space "
            "'space/a'; upload embeddings made for this generator, or pick a generator of that space",
            "space_mismatch",
        )
    ]
    beyond = validate_job(spec(sampler={"classes": [1, 3, 4]}), GENERATOR, SET)
    assert [(p.field, p.message) for p in beyond] == [
        ("sampler.classes", "names [3, 4], but embedding set abc has 3 classes (0..2)")
    ]
    sparse = validate_job(spec(), GENERATOR, SET)
    assert [p.field for p in sparse] == ["embeddings.set_id"] and "2 ('c': 1)" in sparse[0].message
    sd = GeneratorInfo(**{**GENERATOR.__dict__, "kind": "stable-diffusion"})
    benchmark = spec(embeddings={"benchmark": "fmnist-osr"}, sampler={"classes": [6]})
    problems = validate_job(benchmark, sd, EmbeddingsSummary.for_benchmark("fmnist-osr"))
    assert [p.field for p in problems] == ["embeddings", "sampler.classes"]
    assert "benchmark fmnist-osr has 6 classes (0..5)" in problems[1].message


def test_worker_parse_names_fields_like_the_api(oal_env):
    with pytest.raises(ConfigError, match=r"num_outliers: Input should be a valid integer"):
        parse_job_spec({"generator": "gen", "embeddings": {"set_id": "ab" * 8}, "num_outliers": True}, oal_env)
    with pytest.raises(ConfigError, match=r"^invalid job spec: embeddings\.set_id: String should match pattern"):
        parse_job_spec({"generator": "gen", "embeddings": {"set_id": "XYZ"}, "num_outliers": 6}, oal_env)
    limits = {"generator": "gen", "embeddings": {"set_id": "ab" * 8}, "num_outliers": oal_env.max_outliers + 1}
    with pytest.raises(ConfigError, match=rf"^num_outliers: at most {oal_env.max_outliers} allowed"):
        parse_job_spec(limits, oal_env)


# ---------------------------------------------------------------------------- API and worker, same words


@pytest.fixture
def tiny(oal_env, redis_conn, tmp_path_factory) -> GeneratorInfo:
    return install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")


def tiny_spec(set_id: str, **changes) -> dict:
    return {
        "generator": "tiny-random",
        "embeddings": {"set_id": set_id},
        "num_outliers": 6,
        "sampler": {"k": 3, "select": 2, "n_candidates": 4, "keep": 2},
        "diffusion": {"steps": 1, "batch_size": 6},
        **changes,
    }


@pytest.mark.redis
@pytest.mark.parametrize(
    ("case", "refusal"),
    [("space", SpaceMismatchError), ("classes", ConfigError), ("benchmark", ConfigError)],
)
def test_api_and_worker_refuse_with_the_same_words(oal_env, tiny, case, refusal):
    from oal_synth.synthesis import run_synthesis_job

    store = EmbeddingSetStore.from_settings(oal_env)
    own = store.put_bytes(embedding_set_bytes(tiny.space, tiny.embed_dim))["id"]
    body = {
        "space": tiny_spec(store.put_bytes(embedding_set_bytes("other/space-v9", tiny.embed_dim))["id"]),
        "classes": tiny_spec(own, sampler={"k": 3, "select": 2, "n_candidates": 4, "keep": 2, "classes": [0, 9]}),
        "benchmark": tiny_spec(own, embeddings={"benchmark": "fmnist-osr"}),  # tiny-random cannot embed images
    }[case]

    with LiveServer(create_app(oal_env)) as server, server.client() as client:
        answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text

    with pytest.raises(refusal) as worker:
        run_synthesis_job(body, job_id=f"{case:0<32}"[:32])
    assert str(worker.value) == answer.json()["error"]["message"]


def test_validation_and_registry_stay_torch_free():
    script = textwrap.dedent(
        """
        import json, sys
        from oal_synth.generators.registry import find_generator
        from oal_synth.validation import EmbeddingsSummary, validate_job
        from oal_synth.spec import JobSpec
        spec = JobSpec.model_validate({"generator": "g", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6})
        problems = validate_job(spec, None, EmbeddingsSummary.for_benchmark("fmnist-osr"))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers"})
        print(json.dumps({"problems": len(problems), "heavy": heavy}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"problems": 0, "heavy": []}
