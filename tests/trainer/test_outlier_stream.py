"""The outlier stream: whole shards through a seeded pool, the same draw with any number of workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from oal_shared.errors import ShardError
from oal_shared.shards import iter_outlier_samples, load_manifest
from oal_trainer.data import OutlierStream
from tests.utils.trainer_runs import write_test_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_test_shards(tmp_path_factory.mktemp("shards"), num_shards=3, per_shard=20)


def draws(stream: OutlierStream, epoch: int = 0) -> list:
    return [(batch.keys, batch.latents, batch.embeddings, batch.classes) for batch in stream.epoch(epoch)]


def test_the_draw_is_the_same_with_any_number_of_workers(shard_dir):
    streams = [
        OutlierStream(shard_dir, batch_size=8, steps_per_epoch=12, seed=5, shuffle_buffer=16, workers=workers)
        for workers in (0, 1, 2)
    ]
    in_process, *in_workers = [draws(stream, epoch=1) for stream in streams]
    for other in in_workers:
        assert [keys for keys, *_ in other] == [keys for keys, *_ in in_process]
        for mine, theirs in zip(in_process, other, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine[1:], theirs[1:], strict=True))
    assert streams[0].stats.samples == streams[1].stats.samples == streams[2].stats.samples > 8 * 12


def test_every_row_is_the_outlier_its_key_names(shard_dir):
    written = {s.key: s for s in iter_outlier_samples(load_manifest(shard_dir).shard_paths)}
    stream = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=30, seed=0, shuffle_buffer=25)
    seen = Counter()
    for keys, latents, embeddings, classes in draws(stream):
        assert latents.dtype == torch.float32 and len(set(keys)) <= len(keys)
        for row, key in enumerate(keys):
            sample = written[key]
            assert np.array_equal(latents[row].numpy(), sample.latent.astype(np.float32))
            assert np.array_equal(embeddings[row].numpy(), sample.embedding)
            assert int(classes[row]) == sample.cls
            seen[key] += 1
    # 300 draws from 60 outliers through a pool of 25: every one comes up (all but surely).
    assert set(seen) == set(written)


def test_no_shuffle_hands_out_the_planned_shards_in_file_order(shard_dir):
    stream = OutlierStream(shard_dir, batch_size=5, steps_per_epoch=8, seed=0, shuffle_buffer=0)
    keys = [key for batch in stream.epoch(0) for key in batch.keys]
    order = {s.key: i for i, s in enumerate(iter_outlier_samples(load_manifest(shard_dir).shard_paths))}
    positions = [order[key] for key in keys]
    # Within each planned shard of 20, consecutive samples; a new shard starts every 20 draws.
    for start in range(0, len(positions), 20):
        run = positions[start : start + 20]
        assert run == list(range(run[0], run[0] + len(run)))


def test_another_seed_or_epoch_draws_others_and_the_same_draws_the_same(shard_dir):
    def keys(seed: int, epoch: int) -> list:
        stream = OutlierStream(shard_dir, batch_size=8, steps_per_epoch=5, seed=seed, shuffle_buffer=16)
        return [k for batch in stream.epoch(epoch) for k in batch.keys]

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 1) != keys(0, 0) and keys(1, 0) != keys(0, 0)


def test_a_bad_shard_in_a_worker_is_raised_as_itself(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=24)
    path = shard_dir / "outliers-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    stream = OutlierStream(shard_dir, batch_size=8, steps_per_epoch=60, seed=0, shuffle_buffer=0, workers=1)
    with pytest.raises(ShardError, match="outliers-000001.tar"):
        list(stream.epoch(0))


def test_a_job_with_no_readable_shard_is_refused_under_skip(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=4)
    for name in ("outliers-000000.tar", "outliers-000001.tar"):
        (shard_dir / name).write_bytes(b"not a tar at all" * 64)
    stream = OutlierStream(shard_dir, batch_size=4, steps_per_epoch=3, seed=0, on_bad_shard="skip")
    with pytest.raises(ShardError, match="no readable outlier samples in .* \\(2 shards\\)"):
        list(stream.epoch(0))
    assert stream.stats.skipped == 2, "each broken shard counted once, however often it is drawn"
