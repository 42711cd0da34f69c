"""A retried job keeps only the shards that were written for it, as planned; the rest it writes again.

A shard with the right sample count is not enough: it may come from another job, an older version
of the generator's weights, another spec under the same job id, or a sampler that picked other
boundary points. The job runs here directly (`run_synthesis_job(spec, job_id=...)`, no queue) with
the real tiny-random pipeline, and every kept or rewritten shard is read back through the public
shards API. A writer killed mid-write leaves a hidden temp file; the next attempt removes it once
it is old enough that no live writer can own it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from oal_shared.errors import ShardError
from oal_shared.generator_hash import content_hash
from oal_shared.shards import (
    OutlierSample,
    iter_outlier_samples,
    list_shards,
    load_manifest,
    verify_shards,
    write_shard,
)
from oal_synth.generators.files import read_generator_info, write_generator_info
from oal_synth.resume import STALE_TEMP_AGE_S, PlannedSample, confirm_shards
from oal_synth.synthesis import run_synthesis_job
from tests.reliability.conftest import TinyService, tiny_job_spec

pytestmark = [pytest.mark.slow]

NUM_OUTLIERS = 12
SHARD_SIZE = 4  # three shards


def job_spec(service: TinyService, **diffusion) -> dict:
    spec = tiny_job_spec(service.set_id, num_outliers=NUM_OUTLIERS)
    spec["shards"] = {"max_samples": SHARD_SIZE}
    spec["diffusion"] = {**spec["diffusion"], **diffusion}
    return spec


def shard_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in list_shards(folder)}


def samples_of(folder: Path) -> list[OutlierSample]:
    return list(iter_outlier_samples(list_shards(folder)))


def assert_all_written_for(folder: Path, job_id: str, spec: dict) -> None:
    samples = samples_of(folder)
    assert len(samples) == NUM_OUTLIERS and len({s.key for s in samples}) == NUM_OUTLIERS
    assert {s.meta["job_id"] for s in samples} == {job_id}
    assert all(s.key.startswith(f"{job_id}_") for s in samples)
    assert {s.meta["guidance_scale"] for s in samples} == {spec["diffusion"]["guidance_scale"]}
    verify_shards(folder)  # the manifest lists what is on disk


@pytest.fixture
def shard_root(tiny_service: TinyService) -> Path:
    return Path(tiny_service.settings.shard_root)


def test_a_shard_copied_from_another_job_is_written_again(tiny_service, shard_root, caplog):
    spec = job_spec(tiny_service)
    run_synthesis_job(spec, job_id="job-other")
    mine = shard_root / "job-mine"
    mine.mkdir(parents=True)
    shutil.copy(shard_root / "job-other" / "outliers-000001.tar", mine / "outliers-000001.tar")

    with caplog.at_level(logging.WARNING, logger="oal_synth"):
        summary = run_synthesis_job(spec, job_id="job-mine")

    assert summary["resumed_shards"] == 0
    assert_all_written_for(mine, "job-mine", spec)
    assert any("outliers-000001.tar" in r.getMessage() and "job_id" in r.getMessage() for r in caplog.records)


def test_same_job_id_under_another_spec_rewrites_every_shard(tiny_service, shard_root, caplog):
    first = job_spec(tiny_service, guidance_scale=2.0)
    run_synthesis_job(first, job_id="job-reused")
    second = job_spec(tiny_service, guidance_scale=3.5)

    with caplog.at_level(logging.WARNING, logger="oal_synth"):
        summary = run_synthesis_job(second, job_id="job-reused")

    assert summary["resumed_shards"] == 0
    assert_all_written_for(shard_root / "job-reused", "job-reused", second)
    rewrites = [r.getMessage() for r in caplog.records if "writing it again" in r.getMessage()]
    assert len(rewrites) == 3 and all("guidance_scale" in message for message in rewrites), rewrites


def test_new_generator_weights_under_the_same_id_rewrite_the_shards(tiny_service, shard_root):
    spec = job_spec(tiny_service)
    run_synthesis_job(spec, job_id="job-regen")
    folder = Path(tiny_service.settings.generator_root) / "tiny-random"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name] + np.float32(0.01)
    save_file(tensors, weights)
    old = read_generator_info(folder)
    new = dataclasses.replace(old, content_hash=content_hash(folder))  # re-registering the folder
    assert new.content_hash != old.content_hash
    write_generator_info(folder, new)

    summary = run_synthesis_job(spec, job_id="job-regen")

    assert summary["resumed_shards"] == 0
    samples = samples_of(shard_root / "job-regen")
    assert {s.meta["generator"]["content_hash"] for s in samples} == {new.content_hash}


def test_only_the_shard_whose_embeddings_differ_is_rewritten(tiny_service, shard_root, caplog):
    # What another k-NN backend (faiss vs torch) or sampler version does: same job, same spec,
    # other conditioning embeddings. Shard 1 is rebuilt that way; shards 0 and 2 stay as written.
    spec = job_spec(tiny_service)
    run_synthesis_job(spec, job_id="job-sampler")
    folder = shard_root / "job-sampler"
    planned = shard_digests(folder)
    altered = [
        dataclasses.replace(sample, embedding=sample.embedding + np.float32(1e-3))
        for sample in iter_outlier_samples([folder / "outliers-000001.tar"])
    ]
    write_shard(folder, 1, altered)
    assert shard_digests(folder)["outliers-000001.tar"] != planned["outliers-000001.tar"]
    kept_before = {name: digest for name, digest in planned.items() if name != "outliers-000001.tar"}

    with caplog.at_level(logging.WARNING, logger="oal_synth"):
        summary = run_synthesis_job(spec, job_id="job-sampler")

    assert summary["resumed_shards"] == 2
    after = shard_digests(folder)
    assert after == planned  # rewritten to exactly the planned bytes; the others untouched
    assert {name: after[name] for name in kept_before} == kept_before
    assert any("outliers-000001.tar" in r.getMessage() and "embedding" in r.getMessage() for r in caplog.records)


def leave_temp_file_of_killed_writer(target: Path) -> Path:
    """Run a real writer (fsio.atomic_file, as the shard writer uses) in a child and SIGKILL it mid-write."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from oal_shared.fsio import atomic_file\n"
        "with atomic_file(Path(sys.argv[1])) as handle:\n"
        "    handle.write(b'half a tar' * 1000)\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    before = set(target.parent.iterdir()) if target.parent.is_dir() else set()
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", code, str(target)], check=False, timeout=60)
    assert result.returncode == -9
    (left,) = set(target.parent.iterdir()) - before
    assert left.name.startswith(f".{target.name}.") and not target.exists()
    return left


def test_stale_temp_files_of_a_killed_writer_are_removed_and_fresh_ones_kept(tiny_service, shard_root, caplog):
    folder = shard_root / "job-temps"
    stale_shard = leave_temp_file_of_killed_writer(folder / "outliers-000002.tar")
    stale_manifest = leave_temp_file_of_killed_writer(folder / "manifest.json")
    fresh = leave_temp_file_of_killed_writer(folder / "outliers-000001.tar")
    unrelated = folder / ".notes.txt.tmp"
    unrelated.write_text("not ours")
    long_ago = time.time() - STALE_TEMP_AGE_S - 5  # the writer died that long before the retry
    for path in (stale_shard, stale_manifest, unrelated):
        os.utime(path, (long_ago, long_ago))

    with caplog.at_level(logging.INFO, logger="oal_synth"):
        run_synthesis_job(job_spec(tiny_service), job_id="job-temps")

    assert not stale_shard.exists() and not stale_manifest.exists()
    assert fresh.exists(), "a temp file modified moments ago may belong to a live writer"
    assert unrelated.exists()
    assert any(stale_shard.name in r.getMessage() for r in caplog.records)


def test_the_manifest_lists_a_shard_as_found_when_another_attempt_replaced_it(tiny_service, shard_root):
    # Two attempts of one job at once: the other one rewrote shard 1 after this one had written it.
    run_synthesis_job(job_spec(tiny_service), job_id="job-twice")
    folder = shard_root / "job-twice"
    ours = load_manifest(folder).shards
    written = [list(iter_outlier_samples([folder / info.name])) for info in ours]
    plan = [[PlannedSample(s.key, s.cls, s.embedding, s.meta) for s in samples] for samples in written]

    # Same plan, other latents (another GPU's arithmetic): listed as found, with the file's sha256.
    write_shard(folder, 1, [dataclasses.replace(s, latent=s.latent + np.float16(0.01)) for s in written[1]])
    confirmed = confirm_shards(folder, ours, plan.__getitem__)
    assert confirmed[0] == ours[0] and confirmed[2] == ours[2]
    assert confirmed[1].sha256 == shard_digests(folder)["outliers-000001.tar"] != ours[1].sha256

    # Another plan (other embeddings): this attempt must not list it, it gives way.
    write_shard(folder, 1, [dataclasses.replace(s, embedding=s.embedding + np.float32(1e-3)) for s in written[1]])
    with pytest.raises(ShardError, match="outliers-000001.tar.*planned other samples.*embedding"):
        confirm_shards(folder, ours, plan.__getitem__)
