"""The generator content hash: what it covers, and that worker and trainer compute the same one."""

from __future__ import annotations

from pathlib import Path

import pytest

from oal_shared.errors import ConfigError
from oal_shared.generator_hash import GENERATOR_INFO_FILE, PRETRAIN_REPORT_FILE, content_hash


def make_folder(root: Path) -> Path:
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text('{"latent_channels": 4}')
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00\x01weights")
    (root / "model_index.json").write_text("{}")
    return root


def test_the_hash_follows_the_files_the_loader_reads(tmp_path: Path):
    folder = make_folder(tmp_path / "g")
    first = content_hash(folder)
    assert first == content_hash(make_folder(tmp_path / "copy")), "same files, same hash, wherever they are"

    (folder / GENERATOR_INFO_FILE).write_text('{"id": "g"}')
    (folder / PRETRAIN_REPORT_FILE).write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("scratch")
    assert content_hash(folder) == first, "descriptions and hidden files stay out"

    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00\x02weights")
    assert content_hash(folder) != first
    moved = make_folder(tmp_path / "moved")
    (moved / "vae" / "config.json").rename(moved / "config.json")
    assert content_hash(moved) != first, "the relative path is part of the hash"


def test_an_empty_folder_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="no model files to hash"):
        content_hash(tmp_path)


def test_the_synthesis_service_uses_this_hash_and_file_name():
    from oal_synth.generators import base, files

    assert files.content_hash is content_hash
    assert base.GENERATOR_INFO_FILE == GENERATOR_INFO_FILE
