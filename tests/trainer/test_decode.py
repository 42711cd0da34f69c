"""Pixel decoding for pixel-oe: the generator's own VAE, checked against the job's manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oal_shared.data.benchmark import load_benchmark
from oal_shared.errors import ConfigError, ShardError
from oal_shared.generator_hash import content_hash
from oal_shared.shards import load_manifest
from oal_trainer.data import InMemoryOutliers
from oal_trainer.decode import DecodedOutliers, PixelDecoder
from tests.utils.shards import TEST_GENERATOR
from tests.utils.trainer_runs import write_test_shards, write_tiny_vae

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("fmnist-osr")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny VAE folder, and a job folder whose manifest names that folder's content hash."""
    root = tmp_path_factory.mktemp("decode")
    generator = write_tiny_vae(root / "generator")
    return generator, write_test_shards(root / "shards", num_shards=2, per_shard=6, generator_dir=generator)


def _decoder(generator: Path, benchmark, **kwargs) -> PixelDecoder:
    return PixelDecoder(
        generator,
        image_size=28,
        in_channels=1,
        mean=benchmark.mean,
        std=benchmark.std,
        device=torch.device("cpu"),
        **kwargs,
    )


def test_pixel_decoder_gives_standardised_id_sized_images(job, benchmark, tmp_path):
    generator, shard_dir = job
    source = InMemoryOutliers(shard_dir, batch_size=4, steps_per_epoch=1, seed=0)
    decoder = _decoder(generator, benchmark, manifest=source.manifest)
    batch = next(source.epoch(0))
    live = decoder.decode(batch.latents)
    assert live.shape == (4, 1, 28, 28)
    raw = live * benchmark.std[0] + benchmark.mean[0]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, "decoded pixels lie in [0, 1] before standardising"

    decoded = DecodedOutliers(decoder, source.manifest, tmp_path / "cache", batch_size=5)
    assert len(decoded.images) == source.manifest.num_samples == 12
    torch.testing.assert_close(decoded.lookup(batch.keys), live, rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    cached = DecodedOutliers(decoder, shard_dir, tmp_path / "cache")  # the folder works too, and hits the cache
    assert torch.equal(cached.images, decoded.images)
    with pytest.raises(ShardError, match="not among the decoded samples"):
        decoded.lookup(["no_such_key"])


def test_a_vae_folder_of_another_generator_is_refused_naming_both_hashes(job, benchmark, tmp_path):
    generator, _ = job
    other_job = write_test_shards(tmp_path / "other-job", num_shards=1, per_shard=2)  # names TEST_GENERATOR
    manifest = load_manifest(other_job)
    with pytest.raises(ConfigError) as caught:
        _decoder(generator, benchmark, manifest=manifest)
    message = str(caught.value)
    assert content_hash(generator) in message and TEST_GENERATOR["content_hash"] in message
    assert f"generator {TEST_GENERATOR['id']!r}" in message and str(other_job) in message


def test_the_hash_covers_the_vae_weights(job, benchmark, tmp_path):
    generator, shard_dir = job
    changed = write_tiny_vae(tmp_path / "changed")
    weights = next((changed / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of the weights differs
    with pytest.raises(ConfigError, match="content hash"):
        _decoder(changed, benchmark, manifest=load_manifest(shard_dir))


def test_decoded_outliers_from_shard_paths_read_the_manifest_first(job, benchmark, tmp_path):
    generator, shard_dir = job
    decoder = _decoder(generator, benchmark)
    urls = [str(p) for p in sorted(shard_dir.glob("outliers-*.tar"))]
    decoded = DecodedOutliers(decoder, urls, tmp_path / "cache", batch_size=8)
    assert decoded.manifest.folder == shard_dir and len(decoded.images) == 12


def test_pixel_decoder_without_a_vae_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="generator_dir: .*vae/config.json missing"):
        PixelDecoder(tmp_path, image_size=28, in_channels=1, mean=(0.5,), std=(0.5,), device=torch.device("cpu"))
