"""The disk fills up while a shard or a checkpoint is written: the old files stay whole, the error names the path.

Both writers go through a hidden temp file that is renamed over the target only once complete, so
a write that runs out of space must leave the previous shard, manifest or checkpoint byte for byte
as it was, no temp file behind, and an error that says which file could not be written. The disk is
real: a small tmpfs mounted for the test (root only; skipped elsewhere) and filled to the last page.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from oal_shared.shards import MANIFEST_NAME, iter_outlier_samples, list_shards, verify_shards
from oal_synth.synthesis import run_synthesis_job
from oal_trainer.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from tests.reliability.conftest import TinyService, fill_filesystem, reset_settings, tiny_job_spec

pytestmark = [pytest.mark.slow]


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def temp_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def spec_with(service: TinyService, guidance_scale: float) -> dict:
    spec = tiny_job_spec(service.set_id, num_outliers=12)
    spec["shards"] = {"max_samples": 4}
    spec["diffusion"] = {**spec["diffusion"], "guidance_scale": guidance_scale}
    return spec


def test_disk_full_while_a_shard_is_rewritten_keeps_the_old_shards_and_names_the_path(
    tiny_service, small_filesystem, monkeypatch
):
    monkeypatch.setenv("OAL_SHARD_ROOT", str(small_filesystem / "shards"))
    reset_settings()
    run_synthesis_job(spec_with(tiny_service, 2.0), job_id="job-full")
    folder = small_filesystem / "shards" / "job-full"
    before = digests(folder)
    assert MANIFEST_NAME in before and len(list_shards(folder)) == 3
    filler = fill_filesystem(small_filesystem)

    # Another spec under the same job id: every shard must be written again, and the first fails.
    with pytest.raises(OSError) as caught:
        run_synthesis_job(spec_with(tiny_service, 3.5), job_id="job-full")

    assert caught.value.errno == errno.ENOSPC
    assert str(folder / "outliers-000000.tar") in str(caught.value), caught.value
    assert digests(folder) == before  # the old shards, the lock and the old manifest, byte for byte
    assert temp_files(folder) == []
    verify_shards(folder)

    # The same spec: every shard is kept, and the manifest rewrite is what fails.
    with pytest.raises(OSError) as caught:
        run_synthesis_job(spec_with(tiny_service, 2.0), job_id="job-full")
    assert caught.value.errno == errno.ENOSPC
    assert str(folder / MANIFEST_NAME) in str(caught.value), caught.value
    assert digests(folder) == before and temp_files(folder) == []

    filler.unlink()  # space again: the same job now completes under the new spec
    run_synthesis_job(spec_with(tiny_service, 3.5), job_id="job-full")
    samples = list(iter_outlier_samples(list_shards(folder)))
    assert {sample.meta["guidance_scale"] for sample in samples} == {3.5} and len(samples) == 12
    verify_shards(folder)


def tiny_training_parts(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(48, 48)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 48)).square().mean().backward()
    optimizer.step()  # momentum buffers: the optimiser has tensor state to save too
    return model, optimizer


def test_disk_full_while_a_checkpoint_is_saved_keeps_the_old_checkpoint_and_names_the_path(small_filesystem):
    path = small_filesystem / "run" / "checkpoints" / "last.safetensors"
    resume_key = {"recipe": "ce", "seed": 0}
    model, optimizer = tiny_training_parts(seed=0)
    save_checkpoint(path, {"model": model}, {"model": optimizer}, TrainingState(epoch=1, step=10), resume_key)
    saved_weight = model.weight.detach().clone()
    before = digests(path.parent)
    filler = fill_filesystem(small_filesystem)

    newer, newer_optimizer = tiny_training_parts(seed=1)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is the trainer's; the test is the message
        save_checkpoint(path, {"model": newer}, {"model": newer_optimizer}, TrainingState(epoch=2, step=20), resume_key)

    assert str(path) in str(caught.value), f"{type(caught.value).__name__}: {caught.value}"
    assert digests(path.parent) == before
    assert temp_files(path.parent) == []
    filler.unlink()
    restored, restored_optimizer = tiny_training_parts(seed=2)
    state = load_checkpoint(path, {"model": restored}, {"model": restored_optimizer}, resume_key)
    assert state == TrainingState(epoch=1, step=10)
    torch.testing.assert_close(restored.weight, saved_weight, rtol=0, atol=0)
