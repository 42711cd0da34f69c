"""`oal-synth quality`: the Frechet distance, pixel error and blur numbers against hand-computed values,
and the command on the smoke generator and a real job it synthesised (JSON complete, bad paths named)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from oal_synth.cli import EXIT_REFUSED, app
from oal_synth.quality_metrics import (
    frechet_distance,
    frechet_from_stats,
    high_frequency_fraction,
    laplacian_variance,
    percentile_of,
    pixel_errors,
    psnr,
    sharpness,
)
from tests.utils.tiny_sd import smoke_generator_folder, tiny_model_runtime

runner = CliRunner()


def _text(result) -> str:
    """The command's output without rich's line wrapping (it breaks long paths anywhere)."""
    return result.output.replace("\n", "")


# ------------------------------------------------------------------ Frechet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shifted_and_scaled_copy_is_the_closed_form():
    # Y = s X + m: mean s mu + m, covariance s^2 C, so FD = ||(1 - s) mu - m||^2 + (1 - s)^2 Tr(C).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + rng.normal(size=8)
    s, m = 0.5, rng.normal(size=8)
    mu, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    expected = np.sum(((1 - s) * mu - m) ** 2) + (1 - s) ** 2 * np.trace(cov)
    assert frechet_distance(x, s * x + m) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, x + m) == pytest.approx(np.sum(m**2), rel=1e-6)


def test_frechet_distance_of_known_gaussians():
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 = 1 + (2 - 1)^2.
    assert frechet_from_stats(np.zeros(1), np.array([[4.0]]), np.ones(1), np.array([[1.0]])) == pytest.approx(2.0)
    # Full covariances that do not commute: Tr((A B)^1/2) = Tr((A^1/2 B A^1/2)^1/2), computed with eigh.
    rng = np.random.default_rng(3)
    a, b = (lambda q: q @ q.T + np.eye(6))(rng.normal(size=(6, 6))), (lambda q: q @ q.T)(rng.normal(size=(6, 6)))
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    values, vectors = np.linalg.eigh(a)
    root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ b @ root_a)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(a) + np.trace(b) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet_from_stats(mu_a, a, mu_b, b) == pytest.approx(expected, rel=1e-6)
    # From samples of those Gaussians the estimate approaches it.
    big_a = rng.multivariate_normal(mu_a, a, size=40_000)
    big_b = rng.multivariate_normal(mu_b, b, size=40_000)
    assert frechet_distance(big_a, big_b) == pytest.approx(expected, rel=0.05)


# ------------------------------------------------------------------ pixels and blur


def test_pixel_errors_of_a_known_pair():
    originals = np.zeros((3, 28, 28))
    reconstructions = np.full((3, 28, 28), 0.1)
    reconstructions[2] = 0.2  # per-image MSE 0.01, 0.01, 0.04
    errors = pixel_errors(reconstructions, originals)
    assert errors["mse"] == pytest.approx(0.02)
    assert errors["psnr_db"] == pytest.approx(10 * np.log10(50))  # 1 / 0.02
    assert errors["mean_image_psnr_db"] == pytest.approx((20 + 20 + 10 * np.log10(25)) / 3)
    assert psnr(0.0) == 100.0
    with pytest.raises(ValueError, match="same shape"):
        pixel_errors(reconstructions[:2], originals)


def test_blur_lowers_both_sharpness_numbers():
    checker = (np.indices((28, 28)).sum(axis=0) % 2).astype(float)[None]  # the highest frequency there is
    ramp = np.tile(0.5 + 0.5 * np.cos(2 * np.pi * np.arange(28) / 28), (28, 1))[None]  # one cycle per image
    assert high_frequency_fraction(checker)[0] == pytest.approx(1.0)
    assert high_frequency_fraction(ramp)[0] == pytest.approx(0.0, abs=1e-12)
    assert laplacian_variance(np.full((1, 28, 28), 0.3))[0] == pytest.approx(0.0)
    images = np.random.default_rng(4).random((8, 28, 28))
    blurred = ndimage.gaussian_filter(images, sigma=(0, 1.5, 1.5))
    numbers = sharpness(blurred, images)
    assert numbers["laplacian_variance_ratio"] < 0.2 and numbers["high_frequency_ratio"] < 0.2
    assert sharpness(images, images)["laplacian_variance_ratio"] == pytest.approx(1.0)


def test_percentile_of_counts_the_reference_strictly_below():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(percentile_of([0.5, 2.0, 2.5, 9.0], reference), [0.0, 25.0, 50.0, 100.0])


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory):
    """The smoke generator and a real job it synthesised (12 outliers from 20 embedded images per class)."""
    from oal_shared.settings import Settings
    from oal_synth import synthesis

    base = tmp_path_factory.mktemp("quality")
    generator = smoke_generator_folder(tmp_path_factory.getbasetemp())
    root = base / "generators"
    shutil.copytree(generator, root / "fmnist-ldm")
    settings = Settings(generator_root=root, shard_root=base / "shards")
    spec = {
        "generator": "fmnist-ldm",
        "embeddings": {"benchmark": "fmnist-osr", "per_class": 20},
        "num_outliers": 12,
        "seed": 3,
        "sampler": {"k": 5, "select": 3, "n_candidates": 20, "keep": 2},
        "diffusion": {"steps": 2, "guidance_scale": 3.0, "batch_size": 8},
    }
    mp = pytest.MonkeyPatch()
    mp.setattr(synthesis, "get_settings", lambda: settings)
    try:
        with tiny_model_runtime():
            summary = synthesis.run_synthesis_job(spec, job_id="quality-job")
    finally:
        mp.undo()
    return root / "fmnist-ldm", Path(summary["output_dir"])


def test_quality_writes_every_number_for_the_smoke_generator_and_its_job(smoke_job, tmp_path):
    generator, job_dir = smoke_job
    out = tmp_path / "out" / "quality.json"
    with tiny_model_runtime():
        args = ["quality", str(generator), "--shards", str(job_dir), "--out", str(out), "--per-class", "8"]
        result = runner.invoke(app, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "Frechet" in result.output and "Boundary outliers" in result.output
    report = json.loads(out.read_text())
    names = report["class_names"]
    assert len(names) == 6 and set(report["reconstruction"]["per_class"]) == set(names)
    for section in ("reconstruction", "generation"):
        assert set(report[section]["per_class"]) == set(names) and report[section]["overall"]["n"] == 48
    overall = report["generation"]["overall"]
    for key in ("fd_generated_vs_real", "fd_reconstructed_vs_real", "fd_real_vs_real"):
        assert overall[key] >= 0.0
    assert 0.0 <= overall["own_class_accuracy"] <= 1.0
    assert report["reconstruction"]["overall"]["mse"] > 0 and report["config"]["steps"] == 2

    boundary = report["boundary"]
    assert boundary["measured_outliers"] == boundary["num_outliers"] == 12
    assert boundary["ks"] == [1, 5]
    # The job's ID set was re-made exactly: the k-NN distances it recorded come out again.
    assert boundary["recorded_knn_distance_max_abs_diff"] < 1e-4
    assert set(boundary["sets"]) == {"conditioning", "decoded", "id_conditioned", "real_test", "reconstructions"}
    decoded = boundary["sets"]["decoded"]
    assert decoded["n"] == 12 and 0.0 <= decoded["k5"]["percentile"]["p50"] <= 100.0
    assert sum(decoded["predicted_class_fraction"]) == pytest.approx(1.0)
    # The sampler kept the lowest-density candidates: the conditioning embeddings sit past the class's ID points.
    assert boundary["sets"]["conditioning"]["k5"]["percentile"]["p50"] > 50.0
    # The same command again: every number is seeded.
    again = tmp_path / "again.json"
    with tiny_model_runtime():
        result = runner.invoke(app, [*args[:-4], "--out", str(again), "--per-class", "8", "--steps", "2"])
    assert result.exit_code == 0, result.output
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    for report_ in (first, second):
        report_.pop("seconds"), report_.pop("load_average")
    assert first == second


def test_a_bad_generator_path_is_named(tmp_path):
    out = tmp_path / "q.json"
    result = runner.invoke(app, ["quality", str(tmp_path / "missing"), "--out", str(out)])
    assert result.exit_code == EXIT_REFUSED
    assert "GENERATOR_DIR" in _text(result) and "missing" in _text(result) and not out.exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["quality", str(tmp_path / "empty"), "--out", str(out)])
    assert result.exit_code == EXIT_REFUSED and "GENERATOR_DIR" in _text(result)
    assert f"{tmp_path / 'empty' / 'oal_generator.json'}: generator info file is missing" in _text(result)


def test_a_bad_job_path_is_named(smoke_job, tmp_path):
    generator, job_dir = smoke_job
    out = tmp_path / "q.json"
    with tiny_model_runtime():
        args = ["quality", str(generator), "--shards", str(tmp_path / "nojob"), "--out", str(out)]
        result = runner.invoke(app, [*args, "--per-class", "2", "--steps", "1"])
    assert result.exit_code == EXIT_REFUSED
    assert f"--shards: {tmp_path / 'nojob'}: no such folder" in _text(result) and not out.exists()
    # Another generator (one byte of its encoder config changed) did not make these latents.
    other = tmp_path / "other"
    shutil.copytree(generator, other)
    with (other / "condition_encoder" / "config.json").open("a") as handle:
        handle.write("\n")
    result = runner.invoke(app, ["quality", str(other), "--shards", str(job_dir), "--out", str(out)])
    assert result.exit_code == EXIT_REFUSED and "content hash" in _text(result) and str(job_dir) in _text(result)
