"""`oal-synth export`: a job's outliers decoded by its generator's real diffusers VAE into PNGs with an
OpenOOD image list or class folders, provenance beside them; the generator hash checked first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from oal_shared.errors import ConfigError
from oal_shared.outlier_images import LatentImageDecoder, to_uint8_hwc
from oal_shared.shards import iter_outlier_samples, load_manifest
from oal_synth.cli import EXIT_REFUSED, app
from oal_synth.export import IMGLIST_FILE, PROVENANCE_FILE, SAMPLES_FILE, class_folder, export_job
from tests.utils.trainer_runs import write_test_shards, write_tiny_vae

runner = CliRunner()
PER_SHARD, SHARDS = 5, 2


@pytest.fixture
def job(oal_env):
    """A finished job made by generator "test-vae", whose folder sits under OAL_GENERATOR_ROOT."""
    generator = write_tiny_vae(Path(oal_env.generator_root) / "test-vae")
    job_dir = write_test_shards(Path(oal_env.shard_root) / "job-1", SHARDS, PER_SHARD, generator_dir=generator)
    return job_dir, generator


def _expected_pixels(job_dir: Path, generator: Path) -> dict[str, np.ndarray]:
    manifest = load_manifest(job_dir)
    decoder = LatentImageDecoder(generator, manifest)
    samples = list(iter_outlier_samples(manifest.shard_paths, layout=manifest.layout))
    latents = torch.from_numpy(np.stack([s.latent.astype(np.float32) for s in samples]))
    return dict(zip([s.key for s in samples], to_uint8_hwc(decoder.decode(latents)), strict=True))


def test_openood_export_writes_pngs_an_image_list_and_the_provenance(job, tmp_path):
    job_dir, generator = job
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(job_dir), "--format", "openood", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = (out / IMGLIST_FILE).read_text().splitlines()
    assert len(lines) == SHARDS * PER_SHARD
    expected = _expected_pixels(job_dir, generator)
    for line in lines:
        path, label = line.split(" ")
        assert label == "-1" and not path.startswith("/")  # OpenOOD: relative to data_dir; < 0 = outlier
        pixels = np.asarray(Image.open(out / path))
        key = Path(path).stem
        np.testing.assert_array_equal(pixels, expected[key][..., 0])  # grey VAE: one channel, lossless PNG
    assert {Path(line.split(" ")[0]).stem for line in lines} == set(expected)

    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert provenance["manifest"] == manifest
    assert provenance["generator"]["content_hash"] == manifest["generator"]["content_hash"]
    assert provenance["count"] == SHARDS * PER_SHARD and provenance["format"] == "openood"
    records = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [r["path"] for r in records] == [line.split(" ")[0] for line in lines]
    assert all("meta" in r and isinstance(r["class"], int) for r in records)


def test_imagefolder_export_groups_by_source_class_in_class_order(job, tmp_path):
    job_dir, _ = job
    result = export_job(job_dir, tmp_path / "folders", format="imagefolder", generator_dir=job[1])
    manifest = load_manifest(job_dir)
    classes = [s.cls for s in iter_outlier_samples(manifest.shard_paths)]
    folders = sorted(p.name for p in result.out.iterdir() if p.is_dir())
    assert folders == sorted({class_folder(c, None) for c in classes})
    for cls in set(classes):
        assert len(list((result.out / class_folder(cls, None)).glob("*.png"))) == classes.count(cls)
    assert not (result.out / IMGLIST_FILE).exists() and (result.out / PROVENANCE_FILE).is_file()
    assert class_folder(3, ["a", "b", "c", "T-shirt/top"]) == "003_T-shirt_top"


def test_another_generator_is_refused_before_anything_is_written(job, oal_env, tmp_path):
    job_dir, _ = job
    other = write_tiny_vae(Path(oal_env.generator_root) / "other", image_channels=3)
    out = tmp_path / "refused"
    result = runner.invoke(app, ["export", str(job_dir), "--out", str(out), "--generator-dir", str(other)])
    assert result.exit_code == EXIT_REFUSED
    assert "content hash" in result.output and "test-vae" in result.output
    assert not out.exists() and not list(tmp_path.glob(".refused.tmp-*"))


def test_bad_targets_are_refused_naming_the_option(job, oal_env, tmp_path):
    job_dir, generator = job
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="--out"):
        export_job(job_dir, tmp_path / "full", format="openood", generator_dir=generator)
    with pytest.raises(ConfigError, match="format"):
        export_job(job_dir, tmp_path / "new", format="webp", generator_dir=generator)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = runner.invoke(app, ["export", str(job_dir), "--out", str(tmp_path / "e"), "--generator-dir", str(outside)])
    assert result.exit_code == EXIT_REFUSED and "outside" in result.output
    result = runner.invoke(app, ["export", "no-such-job", "--out", str(tmp_path / "e")])
    assert result.exit_code == EXIT_REFUSED and "manifest" in result.output


def test_a_job_id_names_its_folder_under_the_shard_root(job, tmp_path):
    result = runner.invoke(app, ["export", "job-1", "--out", str(tmp_path / "by-id")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "by-id" / IMGLIST_FILE).read_text().splitlines()) == SHARDS * PER_SHARD
