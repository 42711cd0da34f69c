"""ID tensors, seeded loaders and augmentation; outlier streams that hand out exactly B per step."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from oal_shared.data.benchmark import load_benchmark
from oal_shared.errors import ConfigError, ManifestError, ShardError
from oal_shared.shards import MANIFEST_NAME, describe_shard, read_manifest, write_manifest
from oal_trainer.data import (
    InMemoryOutliers,
    OutlierStream,
    augment_batch,
    black_pixel,
    id_loader,
    id_train_set,
    reduce_latents,
    reduced_latent_dim,
    slice_benchmark,
    steps_per_epoch,
)
from tests.utils.shards import TEST_GENERATOR
from tests.utils.trainer_runs import EMBED_DIM, LATENT_SHAPE, write_test_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("fmnist-osr")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_test_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=24)


def test_id_train_set_is_the_standardised_subset(benchmark):
    train = id_train_set(benchmark, subset=200, seed=0)
    assert train.images.shape == (200, 1, 28, 28) and train.images.dtype == torch.float32
    raw = benchmark.id_train.images[train.source_index].astype(np.float32) / 255.0  # (N, 28, 28)
    undone = train.images[:, 0].numpy() * benchmark.std[0] + benchmark.mean[0]
    np.testing.assert_allclose(undone, raw, atol=1e-5)
    np.testing.assert_array_equal(train.labels.numpy(), benchmark.id_train.labels[train.source_index])


def test_subset_depends_on_the_seed_only(benchmark):
    a = id_train_set(benchmark, subset=100, seed=0).source_index
    b = id_train_set(benchmark, subset=100, seed=0).source_index
    c = id_train_set(benchmark, subset=100, seed=1).source_index
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(id_train_set(benchmark, subset=None, seed=0)) == len(benchmark.id_train)


def test_id_loader_order_is_fixed_by_seed_and_epoch(benchmark):
    train = id_train_set(benchmark, subset=100, seed=0)

    def rows(seed, epoch):
        return [batch[2].tolist() for batch in id_loader(train, 16, seed, epoch)]

    first = rows(0, 0)
    assert len(first) == steps_per_epoch(100, 16) == 6
    assert all(len(batch) == 16 for batch in first), "every step sees exactly B images"
    assert first == rows(0, 0)
    assert first != rows(0, 1)
    assert first != rows(1, 0)


def test_id_loader_refuses_a_batch_larger_than_the_data(benchmark):
    train = id_train_set(benchmark, subset=10, seed=0)
    with pytest.raises(ConfigError, match="batch_size: 16"):
        id_loader(train, 16, 0, 0)


def test_augmented_images_are_padded_crops_or_their_mirror():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 10, 10)
    pad_value = torch.full((1, 1, 1, 1), -3.0)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=2, hflip=True, pad_value=pad_value)
    again = augment_batch(x, torch.Generator().manual_seed(0), padding=2, hflip=True, pad_value=pad_value)
    assert torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-3.0)
    shifted = 0
    for i in range(6):
        windows = [
            window
            for dy in range(5)
            for dx in range(5)
            for window in (padded[i, :, dy : dy + 10, dx : dx + 10],)
            for window in (window, window.flip(-1))
        ]
        assert any(torch.equal(out[i], w) for w in windows), f"image {i} is no crop of its padded input"
        shifted += not torch.equal(out[i], x[i])
    assert shifted > 0, "augmentation changed nothing"


def test_black_pixel_is_zero_in_raw_units(benchmark):
    value = black_pixel(benchmark.mean, benchmark.std)
    assert value.shape == (1, 1, 1, 1)
    assert value.item() * benchmark.std[0] + benchmark.mean[0] == pytest.approx(0.0, abs=1e-6)


def test_slice_benchmark_cuts_every_evaluation_set(benchmark):
    small = slice_benchmark(benchmark, per_set=20, seed=0)
    assert len(small.id_test) == 20
    assert [len(s) for s in small.ood_sets()] == [20] * len(benchmark.ood_sets())
    assert len(small.id_train) == len(benchmark.id_train), "training data is not an evaluation set"


def _keys(source, epoch):
    return [key for batch in source.epoch(epoch) for key in batch.keys]


def test_outlier_stream_gives_exactly_b_per_step_for_a_whole_epoch(shard_dir):
    # 7 steps x 10 = 70 draws from 48 samples: the resampled stream must keep going.
    stream = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=7, seed=0, shuffle_buffer=8)
    assert stream.latent_shape == LATENT_SHAPE and stream.embed_dim == EMBED_DIM
    batches = list(stream.epoch(0))
    assert len(batches) == 7
    for batch in batches:
        assert batch.embeddings.shape == (10, EMBED_DIM) and batch.embeddings.dtype == torch.float32
        assert batch.latents.shape == (10, *LATENT_SHAPE) and batch.latents.dtype == torch.float32
        assert batch.classes.shape == (10,) and len(batch.keys) == 10
    again = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=7, seed=0, shuffle_buffer=8)
    assert _keys(again, 0) == [k for b in batches for k in b.keys], "same seed and epoch, same draw"
    assert _keys(again, 1) != _keys(again, 0), "another epoch, another draw"


def test_in_memory_outliers_have_the_same_interface(shard_dir):
    memory = InMemoryOutliers(shard_dir, batch_size=10, steps_per_epoch=7, seed=0)
    stream = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=7, seed=0)
    assert (memory.latent_shape, memory.embed_dim) == (stream.latent_shape, stream.embed_dim)
    batches = list(memory.epoch(0))
    assert len(batches) == 7 and all(len(b) == 10 for b in batches)
    assert len(set(_keys(memory, 0)[:48])) == 48, "the first 48 draws are a permutation of all samples"
    assert _keys(memory, 0) == _keys(memory, 0)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_bad_shard_is_named_in_the_error(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=24)
    _truncate(shard_dir / "outliers-000001.tar")
    # 60 steps of 8 draw 20 shards with replacement: the bad one is drawn except with p = 2**-20.
    stream = OutlierStream(shard_dir, batch_size=8, steps_per_epoch=60, seed=0, shuffle_buffer=0)
    with pytest.raises(ShardError, match="outliers-000001.tar"):
        list(stream.epoch(0))


def test_a_worker_process_reads_the_same_stream(shard_dir):
    in_process = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=5, seed=3, shuffle_buffer=8)
    in_worker = OutlierStream(shard_dir, batch_size=10, steps_per_epoch=5, seed=3, shuffle_buffer=8, workers=1)
    assert _keys(in_worker, 0) == _keys(in_process, 0)
    assert in_worker.stats.samples == in_process.stats.samples >= 50, "counts made in the worker arrive"
    assert in_worker.stats.batches == 5


def test_a_bad_shard_can_be_skipped_and_counted(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=24)
    _truncate(shard_dir / "outliers-000001.tar")
    stream = OutlierStream(shard_dir, batch_size=8, steps_per_epoch=12, seed=0, on_bad_shard="skip", workers=1)
    batches = list(stream.epoch(0))
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert stream.stats.skipped >= 1
    assert any("outliers-000001.tar" in error for error in stream.stats.errors)


def test_an_empty_shard_folder_is_refused(tmp_path):
    with pytest.raises(ManifestError, match=f"{re.escape(str(tmp_path))}: no manifest.json and no shards"):
        OutlierStream(tmp_path, batch_size=4, steps_per_epoch=1, seed=0)


@pytest.mark.parametrize("source_cls", [OutlierStream, InMemoryOutliers])
def test_a_job_still_running_is_refused(tmp_path, source_cls):
    # What a running job leaves: finished shards, and no manifest yet (it is written last).
    shard_dir = write_test_shards(tmp_path / "job", num_shards=2, per_shard=4)
    (shard_dir / MANIFEST_NAME).unlink()
    with pytest.raises(
        ManifestError, match=f"{re.escape(str(shard_dir))}: 2 shards but no manifest.json: .*still running.*crashed"
    ):
        source_cls(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)


def test_sources_take_shapes_and_shards_from_the_manifest(shard_dir):
    stream = OutlierStream(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)
    manifest = read_manifest(shard_dir)
    assert stream.manifest.document == manifest
    assert stream.latent_shape == tuple(manifest["layout"]["latent_shape"]) == LATENT_SHAPE
    assert stream.embed_dim == manifest["layout"]["embed_dim"] == EMBED_DIM
    assert stream.urls == [str(shard_dir / entry["name"]) for entry in manifest["shards"]]
    assert stream.manifest.generator.content_hash == manifest["generator"]["content_hash"]
    assert stream.manifest.num_samples == 48


def test_a_shard_the_manifest_does_not_list_is_not_read(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=4)
    (shard_dir / "outliers-000001.tar").rename(shard_dir / "outliers-000007.tar")
    write_manifest(shard_dir, {}, [describe_shard(shard_dir / "outliers-000000.tar")], generator=TEST_GENERATOR)
    memory = InMemoryOutliers(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)
    assert len(memory.data) == 4, "only the listed shard is loaded"


def test_a_sample_unlike_the_manifest_layout_is_a_bad_sample(tmp_path):
    shard_dir = write_test_shards(tmp_path, num_shards=2, per_shard=4)
    path = shard_dir / MANIFEST_NAME
    document = json.loads(path.read_text())
    document["layout"]["embed_dim"] = EMBED_DIM + 1
    path.write_text(json.dumps(document))
    with pytest.raises(ShardError, match=rf"embedding \({EMBED_DIM},\), but the manifest has"):
        InMemoryOutliers(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)


@pytest.mark.parametrize("source_cls", [OutlierStream, InMemoryOutliers])
def test_a_shard_replaced_after_the_job_is_refused(tmp_path, source_cls):
    shard_dir = write_test_shards(tmp_path / "job", num_shards=2, per_shard=4)
    write_test_shards(tmp_path / "bigger", num_shards=2, per_shard=5)
    for name in ("outliers-000000.tar", "outliers-000001.tar"):  # same names, readable, more samples each
        (tmp_path / "bigger" / name).replace(shard_dir / name)
    with pytest.raises(ShardError, match=r"outliers-00000[01]\.tar: .* but the manifest records .* changed after"):
        list(source_cls(shard_dir, batch_size=4, steps_per_epoch=3, seed=0).epoch(0))  # memory reads on opening


def test_in_memory_outliers_refuse_a_manifest_whose_counts_differ_from_its_shards(tmp_path):
    shard_dir = write_test_shards(tmp_path / "job", num_shards=2, per_shard=4)
    path = shard_dir / MANIFEST_NAME
    document = json.loads(path.read_text())
    document["shards"][1]["count"], document["num_samples"] = 5, 9  # the files are as the job wrote them
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError, match="the shards hold 8 samples, the manifest says 9"):
        InMemoryOutliers(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)


@pytest.fixture(scope="module")
def few_outliers(tmp_path_factory) -> Path:
    """A job with 5 outliers, fewer than one batch of 8."""
    return write_test_shards(tmp_path_factory.mktemp("few"), num_shards=1, per_shard=5)


def test_in_memory_batches_are_full_when_the_job_has_fewer_outliers_than_a_batch(few_outliers, caplog):
    with caplog.at_level(logging.WARNING, logger="oal_trainer.data"):
        memory = InMemoryOutliers(few_outliers, batch_size=8, steps_per_epoch=4, seed=0)
    assert "has 5 outliers, fewer than the 8 each step takes" in caplog.text
    batches = list(memory.epoch(0))
    assert [len(b) for b in batches] == [8] * 4
    assert all(b.embeddings.shape == (8, EMBED_DIM) and b.latents.shape == (8, *LATENT_SHAPE) for b in batches)
    for batch in batches:
        assert len(set(batch.keys)) == 5, "each batch holds every outlier, some twice"


def test_stream_batches_are_full_when_the_job_has_fewer_outliers_than_a_batch(few_outliers, caplog):
    with caplog.at_level(logging.WARNING, logger="oal_trainer.data"):
        stream = OutlierStream(few_outliers, batch_size=8, steps_per_epoch=4, seed=0, shuffle_buffer=4)
    assert "has 5 outliers, fewer than the 8 each step takes" in caplog.text
    batches = list(stream.epoch(0))
    assert [len(b) for b in batches] == [8] * 4
    assert all(b.latents.shape == (8, *LATENT_SHAPE) for b in batches)


def test_latent_reductions():
    latents = torch.randn(3, *LATENT_SHAPE)
    flat = reduce_latents(latents, "flatten")
    assert flat.shape == (3, reduced_latent_dim(LATENT_SHAPE, "flatten")) == (3, 256)
    reference = reduce_latents(latents, "mean_ch_h")
    assert reference.shape == (3, reduced_latent_dim(LATENT_SHAPE, "mean_ch_h")) == (3, 8)
    torch.testing.assert_close(reference[1, 5], latents[1, :, :, 5].mean())
