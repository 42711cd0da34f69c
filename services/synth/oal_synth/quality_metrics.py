"""The numbers of `oal-synth quality`, as plain functions of arrays (no models): Frechet distance,
pixel error, blur, k-NN percentiles and nearest-class-mean accuracy.

Images are float arrays in [0, 1] of shape (N, H, W); embeddings are (N, D) float arrays.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from scipy import ndimage

from oal_shared.errors import ConfigError

#: Radial spatial frequency (cycles per pixel, Nyquist = 0.5) above which energy counts as "high".
HIGH_FREQUENCY_CUTOFF = 0.25
#: Percentile of a class's ID-to-ID k-NN distances from which a point counts as at the class's edge.
EDGE_PERCENTILE = 95.0


def gaussian_stats(features: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and sample covariance (D, D) of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ConfigError(f"{name}: need at least 2 rows of shape (N, D) for a covariance, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    sqrtm of a product of two covariances may come back with tiny imaginary parts from rounding;
    they are dropped. A near-singular product (fewer samples than dimensions) gets a small ridge
    on both covariances, as pytorch-fid does.
    """
    mu_a, cov_a = gaussian_stats(a, "a")
    mu_b, cov_b = gaussian_stats(b, "b")
    if mu_a.shape != mu_b.shape:
        raise ConfigError(f"frechet_distance: feature sizes differ, {mu_a.shape[0]} and {mu_b.shape[0]}")
    return frechet_from_stats(mu_a, cov_a, mu_b, cov_b)


def frechet_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
            singular = not np.isfinite(covmean).all()
        except scipy.linalg.LinAlgWarning:
            singular = True
    if singular:
        ridge = np.eye(cov_a.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean), 0.0))


def _check_pair(reconstructions: np.ndarray, originals: np.ndarray) -> None:
    if reconstructions.shape != originals.shape or reconstructions.ndim != 3:
        raise ConfigError(
            f"images: expected two arrays of the same shape (N, H, W), got {reconstructions.shape} "
            f"and {originals.shape}"
        )


def pixel_errors(reconstructions: np.ndarray, originals: np.ndarray) -> dict[str, float]:
    """MSE in [0, 1] pixel units over all pixels, PSNR (dB, peak 1) of that MSE, and the mean of
    per-image PSNRs (which weighs well reconstructed images more)."""
    _check_pair(reconstructions, originals)
    per_image = ((np.asarray(reconstructions, np.float64) - originals) ** 2).mean(axis=(1, 2))  # (N,)
    mse = float(per_image.mean())
    return {
        "mse": mse,
        "psnr_db": psnr(mse),
        "mean_image_psnr_db": float(np.mean([psnr(value) for value in per_image])),
    }


def psnr(mse: float) -> float:
    """10 log10(1 / MSE) for pixels in [0, 1]; a perfect copy is capped at 100 dB (not infinity)."""
    return float(min(10.0 * np.log10(1.0 / mse), 100.0)) if mse > 0 else 100.0


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Variance of each image's Laplacian, (N,): the usual focus measure; blur lowers it."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ConfigError(f"images: expected (N, H, W), got {images.shape}")
    kernel = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None]  # 2-D Laplacian per image
    return ndimage.convolve(images, kernel, mode="reflect").var(axis=(1, 2))


def high_frequency_fraction(images: np.ndarray, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> np.ndarray:
    """Share of each image's spectral energy (DC left out) above `cutoff` cycles per pixel, (N,)."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ConfigError(f"images: expected (N, H, W), got {images.shape}")
    power = np.abs(np.fft.fft2(images)) ** 2  # over the last two axes
    fy, fx = np.meshgrid(np.fft.fftfreq(images.shape[1]), np.fft.fftfreq(images.shape[2]), indexing="ij")
    radius = np.hypot(fy, fx)
    ac = radius > 0
    total = power[:, ac].sum(axis=1)
    high = power[:, radius > cutoff].sum(axis=1)
    return np.divide(high, total, out=np.zeros_like(total), where=total > 0)


def sharpness(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Blur as numbers: mean Laplacian variance and high-frequency share of `images`, each also as a
    ratio to the same mean over `reference` (real images; 1 = as sharp, below 1 = blurrier)."""
    lap, lap_ref = laplacian_variance(images).mean(), laplacian_variance(reference).mean()
    high, high_ref = high_frequency_fraction(images).mean(), high_frequency_fraction(reference).mean()
    return {
        "laplacian_variance": float(lap),
        "laplacian_variance_real": float(lap_ref),
        "laplacian_variance_ratio": float(lap / lap_ref) if lap_ref > 0 else float("nan"),
        "high_frequency_fraction": float(high),
        "high_frequency_fraction_real": float(high_ref),
        "high_frequency_ratio": float(high / high_ref) if high_ref > 0 else float("nan"),
    }


def percentile_of(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each value, the percentage of `reference` strictly below it (0-100), (M,)."""
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    if reference.size == 0:
        raise ConfigError("percentile_of: the reference distribution is empty")
    return 100.0 * np.searchsorted(reference, np.asarray(values, dtype=np.float64), side="left") / reference.size


def class_means(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Unit-normalised mean embedding of each class, (K, D); a class with no rows is an error."""
    means = []
    for cls in range(num_classes):
        rows = embeddings[labels == cls]
        if rows.shape[0] == 0:
            raise ConfigError(f"class_means: class {cls} has no embeddings")
        mean = rows.mean(axis=0)
        means.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(means)


def nearest_mean_labels(embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Class of the most cosine-similar class mean for each embedding, (N,)."""
    normed = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return (normed @ means.T).argmax(axis=1)


def distribution_summary(values: np.ndarray) -> dict[str, float]:
    """Mean and the 10th, 50th and 90th percentiles of a 1-D sample."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": float("nan"), "p10": float("nan"), "p50": float("nan"), "p90": float("nan")}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
    }
