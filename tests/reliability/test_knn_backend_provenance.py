"""The k-NN backend of boundary sampling is named by the job spec and recorded with every outlier.

A faiss job says so in each sample's provenance and in the manifest's spec; a retried attempt that
would sample with the other backend does not keep the first attempt's shards (the provenance
differs). The job runs directly with the real tiny-random pipeline, as in test_resume_provenance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oal_shared.shards import iter_outlier_samples, list_shards, load_manifest
from oal_synth.synthesis import run_synthesis_job
from tests.reliability.conftest import TinyService, tiny_job_spec

pytestmark = [pytest.mark.slow]


@pytest.fixture
def shard_root(tiny_service: TinyService) -> Path:
    return Path(tiny_service.settings.shard_root)


def spec_with_backend(service: TinyService, backend: str | None) -> dict:
    spec = tiny_job_spec(service.set_id, num_outliers=6)
    if backend is not None:
        spec["sampler"] = {**spec["sampler"], "knn_backend": backend}
    return spec


def test_a_faiss_job_records_its_backend_and_a_torch_retry_rewrites_its_shards(tiny_service, shard_root):
    pytest.importorskip("faiss")
    run_synthesis_job(spec_with_backend(tiny_service, "faiss"), job_id="job-faiss")
    folder = shard_root / "job-faiss"
    samples = list(iter_outlier_samples(list_shards(folder)))
    assert samples and {s.meta["sampler"]["knn_backend"] for s in samples} == {"faiss"}
    assert load_manifest(folder).spec["sampler"]["knn_backend"] == "faiss"

    # Same job id, default backend: the spec (and every sample's provenance) differs, nothing is kept.
    summary = run_synthesis_job(spec_with_backend(tiny_service, None), job_id="job-faiss")
    assert summary["resumed_shards"] == 0
    resampled = list(iter_outlier_samples(list_shards(folder)))
    assert {s.meta["sampler"]["knn_backend"] for s in resampled} == {"torch"}
    assert load_manifest(folder).spec["sampler"]["knn_backend"] == "torch"
