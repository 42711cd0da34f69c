"""The outlier grid decodes real shards through a real (tiny) VAE into a PNG, one row per class."""

from __future__ import annotations

from pathlib import Path

import pytest

from oal_shared.errors import ConfigError
from oal_shared.shards import load_manifest
from oal_trainer.outlier_grid import collect_latents_per_class, draw_outlier_grid
from tests.utils.trainer_runs import write_test_shards, write_tiny_vae


def test_grid_rows_follow_the_source_classes(tmp_path: Path):
    generator_dir = write_tiny_vae(tmp_path / "generator")
    shard_dir = write_test_shards(tmp_path / "shards", num_shards=1, per_shard=24, generator_dir=generator_dir)
    latents, names = collect_latents_per_class(load_manifest(shard_dir), per_class=3)
    assert latents and all(len(rows) <= 3 for rows in latents.values())
    assert set(names) == set(latents)

    png = draw_outlier_grid(shard_dir, generator_dir, tmp_path / "grid.png", per_class=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_grid_is_not_drawn_with_another_generators_vae(tmp_path: Path):
    shard_dir = write_test_shards(tmp_path / "shards", num_shards=1, per_shard=8)  # made by the test generator
    with pytest.raises(ConfigError, match="content hash"):
        draw_outlier_grid(shard_dir, write_tiny_vae(tmp_path / "other"), tmp_path / "grid.png", per_class=2)
    assert not (tmp_path / "grid.png").exists()
