"""How good is the embedded generator? `oal-synth quality GENERATOR_DIR [--shards JOB_DIR]`.

Three questions, each answered in the condition encoder's own feature space (the space the
outliers are sampled in) and in pixels:

1. **Reconstruction**: how much does the VAE lose? MSE / PSNR of decode(encode(x)) on ID test
   images, and blur as numbers (Laplacian variance and high-frequency energy, against the originals).
2. **Class-conditional samples**: do samples conditioned on a class's embeddings look like that
   class? Per class, N samples through the generator's real sampling path (DDIM 25 steps, guidance
   3.0, as the demo job), decoded and re-embedded; Frechet distance to N real test images of the
   class, beside two baselines with the same N: real vs real (another N test images: the floor)
   and VAE reconstructions vs real (what the VAE alone costs).
3. **Boundary outliers** (`--shards`, `quality_boundary.py`): how far a finished job's outliers sit
   from their class, before and after decoding.

Everything is seeded (`derive_seed("oal-quality-...", seed, ...)`), so a rerun gives the same numbers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from tqdm.auto import tqdm

from oal_shared.data.benchmark import load_benchmark
from oal_shared.errors import ConfigError
from oal_shared.outlier_images import to_uint8_hwc
from oal_shared.seeds import derive_seed
from oal_shared.settings import Settings, get_settings
from oal_synth.generators.embedded import EMBEDDED_KIND, EmbeddedGenerator
from oal_synth.generators.files import read_generator_info
from oal_synth.pretrain import encode_dataset, pad_to_vae
from oal_synth.quality_metrics import (
    class_means,
    distribution_summary,
    frechet_distance,
    nearest_mean_labels,
    pixel_errors,
    sharpness,
)
from oal_synth.spec import DiffusionConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityConfig:
    benchmark: str = "fmnist-osr"
    per_class: int = 200  # generated images per class; also each of the two real test splits
    scheduler: str = "ddim"  # the demo job's sampling
    steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 64
    seed: int = 0
    max_outliers: int | None = None  # decode at most this many of the job's outliers (a seeded subset)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.per_class < 2:
            raise ConfigError(f"per_class must be >= 2 (a covariance needs 2 rows), got {self.per_class}")
        if self.max_outliers is not None and self.max_outliers < 1:
            raise ConfigError(f"max_outliers must be >= 1, got {self.max_outliers}")

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(
            scheduler=self.scheduler,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.batch_size,
            dtype="float32",
        )


@dataclass
class Embedded:
    """Images re-embedded by the condition encoder, with their class and (if any) the conditioning."""

    embeddings: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    conditions: np.ndarray | None = None  # (N, D), the embeddings the images were generated from


def load_embedded_generator(generator_dir: Path, device: str = "cpu") -> EmbeddedGenerator:
    """The embedded generator in `generator_dir`; ConfigError naming the folder when it is not one."""
    generator_dir = Path(generator_dir)
    if not generator_dir.is_dir():
        raise ConfigError(f"GENERATOR_DIR: {generator_dir} is not a folder")
    try:
        info = read_generator_info(generator_dir)
    except ConfigError as exc:
        raise ConfigError(f"GENERATOR_DIR: {exc} (not a generator folder written by oal-synth pretrain)") from exc
    if info.kind != EMBEDDED_KIND:
        raise ConfigError(
            f"GENERATOR_DIR: {generator_dir} holds a {info.kind!r} generator; quality measures the embedded "
            "generator (its condition encoder is the feature space)"
        )
    return EmbeddedGenerator.from_pretrained(generator_dir, device=device, dtype="float32")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) floats in [0, 1] -> uint8 (N, H, W), rounded as PNG export does."""
    return to_uint8_hwc(images)[..., 0]


def class_rows(labels: np.ndarray, cls: int, count: int, namespace: str, seed: int, field: str) -> np.ndarray:
    """`count` seeded rows of class `cls`, sorted; ConfigError naming `field` if the class is too small."""
    rows = np.flatnonzero(labels == cls)
    if rows.size < count:
        raise ConfigError(f"{field}: class {cls} has {rows.size} images, {count} needed (lower --per-class)")
    rng = np.random.default_rng(derive_seed(namespace, seed, cls))
    return np.sort(rng.choice(rows, size=count, replace=False))


def measure_quality(
    generator_dir: str | Path,
    job_dir: str | Path | None = None,
    config: QualityConfig | None = None,
    settings: Settings | None = None,
    progress: bool = False,
) -> dict:
    """Every number of the three studies as a JSON-able dict (see the module docstring)."""
    from oal_synth.quality_boundary import measure_boundary, open_job  # the job half

    config = config if config is not None else QualityConfig()
    settings = settings if settings is not None else get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    generator = load_embedded_generator(Path(generator_dir), config.device)
    benchmark = load_benchmark(config.benchmark, settings)
    names = tuple(benchmark.class_names)
    if generator.info.class_names and tuple(generator.info.class_names) != names:
        raise ConfigError(
            f"--benchmark: {config.benchmark} has classes {names}, the generator in {generator_dir} was "
            f"trained on {tuple(generator.info.class_names)}"
        )
    # A job folder is checked before anything slow runs: it must exist and be this generator's.
    manifest = open_job(Path(job_dir), Path(generator_dir)) if job_dir is not None else None
    n, seconds = config.per_class, {}

    # Real test images: two disjoint splits per class (A is reconstructed, B is the reference).
    split = [
        class_rows(benchmark.id_test.labels, c, 2 * n, "oal-quality-test", config.seed, "--benchmark id_test")
        for c in range(len(names))
    ]
    index_a = np.concatenate([rows[:n] for rows in split])
    index_b = np.concatenate([rows[n:] for rows in split])
    images_a, labels_a = benchmark.id_test.images[index_a], benchmark.id_test.labels[index_a]
    images_b, labels_b = benchmark.id_test.images[index_b], benchmark.id_test.labels[index_b]
    # Conditioning: embeddings of N train images per class (what a job conditions on, before sampling).
    index_c = np.concatenate(
        [
            class_rows(benchmark.id_train.labels, c, n, "oal-quality-condition", config.seed, "--benchmark id_train")
            for c in range(len(names))
        ]
    )
    images_c, labels_c = benchmark.id_train.images[index_c], benchmark.id_train.labels[index_c]

    tick = time.perf_counter()
    real_a = generator.embed_images(images_a).numpy()
    real_b = generator.embed_images(images_b).numpy()
    conditions = generator.embed_images(images_c).numpy()
    means = class_means(conditions, labels_c, len(names))  # the nearest-class-mean classifier
    recon_images = reconstruct(generator, images_a)
    recon = generator.embed_images(to_uint8(recon_images)).numpy()
    seconds["reconstruction"] = time.perf_counter() - tick

    tick = time.perf_counter()
    seeds = [derive_seed("oal-quality-sample", config.seed, int(c), i) for i, c in enumerate(labels_c)]
    samples = generate(generator, conditions, seeds, config.diffusion(), progress)
    generated = generator.embed_images(to_uint8(samples)).numpy()
    seconds["generation"] = time.perf_counter() - tick

    pixels_a = images_a.astype(np.float64) / 255.0
    pixels_b = images_b.astype(np.float64) / 255.0
    recon_pixels, sample_pixels = recon_images[:, 0].double().numpy(), samples[:, 0].double().numpy()
    report = {
        "generator": {"dir": str(generator_dir), **{k: generator.info.to_json()[k] for k in ("id", "space")}},
        "content_hash": generator.info.content_hash,
        "benchmark": config.benchmark,
        "class_names": list(names),
        "config": asdict(config),
        "torch_threads": torch.get_num_threads(),
        "classifier": "nearest class mean (cosine) of the condition-encoder embeddings of the conditioning images",
        "reconstruction": per_class_and_overall(
            names, labels_a, lambda rows: reconstruction_numbers(recon_pixels[rows], pixels_a[rows])
        ),
        "generation": per_class_and_overall(
            names,
            labels_a,
            lambda rows: generation_numbers(
                rows, generated, conditions, real_a, real_b, recon, labels_c, means, sample_pixels, pixels_b
            ),
        ),
        "real_test_accuracy": float((nearest_mean_labels(real_b, means) == labels_b).mean()),
    }
    reference = {
        "id_conditioned": Embedded(generated, labels_c, conditions),
        "real_test": Embedded(real_b, labels_b),
        "reconstructions": Embedded(recon, labels_a),
    }
    if manifest is not None:
        tick = time.perf_counter()
        report["boundary"] = measure_boundary(generator, manifest, config, settings, reference, progress)
        seconds["boundary"] = time.perf_counter() - tick
    else:
        report["boundary"] = None
    report["seconds"] = {**seconds, "total": time.perf_counter() - started}
    report["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    return report


@torch.no_grad()
def reconstruct(generator: EmbeddedGenerator, images: np.ndarray) -> torch.Tensor:
    """decode(posterior mean of encode(x)) for uint8 (N, 28, 28): (N, 1, 28, 28) in [0, 1]."""
    latent_mean, _ = encode_dataset(generator.pipeline.vae, pad_to_vae(images))
    return torch.cat([generator.decode_latents(latent_mean[i : i + 512]) for i in range(0, len(images), 512)])


def generate(
    generator: EmbeddedGenerator, conditions: np.ndarray, seeds: list[int], diffusion: DiffusionConfig, progress: bool
) -> torch.Tensor:
    """Images (N, 1, 28, 28) in [0, 1] through the worker's own path: generate_latents, decode_latents."""
    out = []
    with tqdm(total=len(seeds), desc="samples", unit="img", disable=not progress) as bar:
        for start in range(0, len(seeds), diffusion.batch_size):
            stop = start + diffusion.batch_size
            with torch.inference_mode():
                latents = generator.generate_latents(
                    torch.from_numpy(conditions[start:stop]), [0] * len(seeds[start:stop]), seeds[start:stop], diffusion
                )
                out.append(generator.decode_latents(latents))
            bar.update(len(seeds[start:stop]))
    return torch.cat(out)


def per_class_and_overall(names: tuple[str, ...], labels: np.ndarray, numbers) -> dict:
    """`numbers(rows)` for each class's rows and for all rows."""
    per_class = {name: numbers(np.flatnonzero(labels == c)) for c, name in enumerate(names)}
    return {"overall": numbers(np.arange(len(labels))), "per_class": per_class}


def reconstruction_numbers(recon_pixels: np.ndarray, pixels: np.ndarray) -> dict:
    return {"n": int(len(pixels)), **pixel_errors(recon_pixels, pixels), **sharpness(recon_pixels, pixels)}


def generation_numbers(rows, generated, conditions, real_a, real_b, recon, labels, means, sample_pixels, pixels_b):
    """FD and the rest for the rows of one class (or all): splits A, B and the samples share row order
    by class, with the same count per class, so one row set indexes all of them."""
    cosine = (generated[rows] * conditions[rows]).sum(axis=1) / (
        np.linalg.norm(generated[rows], axis=1) * np.linalg.norm(conditions[rows], axis=1)
    )
    return {
        "n": int(len(rows)),
        "fd_generated_vs_real": frechet_distance(generated[rows], real_b[rows]),
        "fd_reconstructed_vs_real": frechet_distance(recon[rows], real_b[rows]),
        "fd_real_vs_real": frechet_distance(real_a[rows], real_b[rows]),
        "own_class_accuracy": float((nearest_mean_labels(generated[rows], means) == labels[rows]).mean()),
        "reconstruction_accuracy": float((nearest_mean_labels(recon[rows], means) == labels[rows]).mean()),
        "cosine_to_condition": distribution_summary(cosine),
        **{f"sample_{key}": value for key, value in sharpness(sample_pixels[rows], pixels_b[rows]).items()},
    }


def _f(value: float, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def quality_tables(report: dict) -> list[Table]:
    """The report as rich tables: reconstruction, generation and (with a job) boundary outliers."""
    recon = Table(title="VAE reconstruction, ID test images ([0, 1] pixels; ratios vs the originals)")
    for column in ("class", "MSE", "PSNR dB", "Laplacian var ratio", "high-freq ratio"):
        recon.add_column(column, justify="left" if column == "class" else "right")
    rows = [*report["reconstruction"]["per_class"].items(), ("all", report["reconstruction"]["overall"])]
    for name, r in rows:
        recon.add_row(
            name, _f(r["mse"], 4), _f(r["psnr_db"], 2), _f(r["laplacian_variance_ratio"]), _f(r["high_frequency_ratio"])
        )

    gen = Table(title="Class-conditional samples, Frechet distance in the condition encoder's space")
    for column in (
        "class",
        "FD gen-real",
        "FD recon-real",
        "FD real-real",
        "own class",
        "recon own class",
        "cos to cond",
        "sample Laplacian ratio",
    ):
        gen.add_column(column, justify="left" if column == "class" else "right")
    rows = [*report["generation"]["per_class"].items(), ("all", report["generation"]["overall"])]
    for name, g in rows:
        gen.add_row(
            name,
            _f(g["fd_generated_vs_real"]),
            _f(g["fd_reconstructed_vs_real"]),
            _f(g["fd_real_vs_real"]),
            _f(g["own_class_accuracy"]),
            _f(g["reconstruction_accuracy"]),
            _f(g["cosine_to_condition"]["p50"]),
            _f(g["sample_laplacian_variance_ratio"]),
        )
    tables = [recon, gen]
    boundary = report.get("boundary")
    if boundary:
        from oal_synth.quality_boundary import boundary_table

        tables.append(boundary_table(boundary))
    return tables


def jsonable(value):
    """The report with NaN / infinity as null, so the file is strict JSON."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
