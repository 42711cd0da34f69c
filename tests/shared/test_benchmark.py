"""fmnist-osr on the real Fashion-MNIST, the far-OOD sets, and the ImageSet/Benchmark contracts."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oal_shared.data import (
    BENCHMARKS,
    FMNIST_CLASSES,
    FMNIST_OSR_ID_CLASSES,
    FMNIST_OSR_NEAR_CLASSES,
    OOD_LABEL,
    Benchmark,
    ImageSet,
    far_ood,
    fmnist_osr,
    is_ood,
    load_benchmark,
    load_fashion_mnist,
)
from oal_shared.data.fashion_mnist import read_fashion_mnist_files
from oal_shared.errors import ConfigError
from oal_shared.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings that can only find Debian's copy (the one `make setup` installs)."""
    return Settings(fmnist_dir=None, data_dir=tmp_path / "no-data", allow_download=False)


@pytest.fixture
def bench(settings: Settings) -> Benchmark:
    return load_benchmark("fmnist-osr", settings)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_fmnist_osr_sizes_and_labels(bench: Benchmark):
    assert len(bench.id_train) == 36_000 and len(bench.id_test) == 6_000
    assert [(s.name, s.kind, len(s)) for s in bench.ood_sets()] == [
        ("fmnist-near", "near", 4000),
        ("digits", "far", 1797),
        ("textures", "far", 2000),
        ("noise", "far", 3000),
    ]
    assert bench.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag")
    assert (bench.num_classes, bench.in_channels, bench.image_size) == (6, 1, 28)
    assert np.bincount(bench.id_train.labels).tolist() == [6000] * 6
    assert np.bincount(bench.id_test.labels).tolist() == [1000] * 6
    for ood in bench.ood_sets():
        assert ood.images.shape[1:] == (28, 28) and ood.images.dtype == np.uint8
        assert ood.labels.dtype == np.int64 and (ood.labels == OOD_LABEL).all()
        assert is_ood(ood.labels).all()
    assert not is_ood(bench.id_test.labels).any()


def test_id_labels_are_remapped_in_class_order(bench: Benchmark, settings: Settings):
    images, labels = load_fashion_mnist("test", settings)
    for new_label, original in enumerate(FMNIST_OSR_ID_CLASSES):
        np.testing.assert_array_equal(
            bench.id_test.images[bench.id_test.labels == new_label], images[labels == original]
        )
        assert bench.class_names[new_label] == FMNIST_CLASSES[original]


def test_near_set_is_the_near_classes_and_no_id_class(bench: Benchmark, settings: Settings):
    images, labels = load_fashion_mnist("test", settings)
    assert not set(FMNIST_OSR_ID_CLASSES) & set(FMNIST_OSR_NEAR_CLASSES)
    near_mask = np.isin(labels, FMNIST_OSR_NEAR_CLASSES)
    np.testing.assert_array_equal(bench.near[0].images, images[near_mask])
    # No near image is byte-identical to any ID test image.
    id_hashes = {image.tobytes() for image in bench.id_test.images}
    assert not any(image.tobytes() in id_hashes for image in bench.near[0].images)


def test_mean_std_are_id_train_stats(bench: Benchmark):
    # From a 256-bin histogram, a different route than the loader's integer sums.
    counts = np.bincount(bench.id_train.images.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256) / 255.0
    mean = counts @ levels / counts.sum()
    std = np.sqrt(counts @ (levels - mean) ** 2 / counts.sum())
    np.testing.assert_allclose(bench.mean, [mean], rtol=1e-9)
    np.testing.assert_allclose(bench.std, [std], rtol=1e-9)


def test_benchmark_is_cached_and_read_only(bench: Benchmark, settings: Settings):
    assert load_benchmark("fmnist-osr", settings) is bench
    for image_set in (bench.id_train, bench.id_test, *bench.ood_sets()):
        assert not image_set.images.flags.writeable and not image_set.labels.flags.writeable


def test_same_bytes_every_time_also_after_cache_clear(bench: Benchmark, settings: Settings):
    before = {s.name: (sha256(s.images), sha256(s.labels)) for s in (bench.id_train, *bench.ood_sets())}
    for cached in (far_ood.digits, far_ood.textures, far_ood.noise, read_fashion_mnist_files):
        cached.cache_clear()
    fmnist_osr._fmnist_osr.cache_clear()

    rebuilt = load_benchmark("fmnist-osr", settings)

    assert rebuilt is not bench
    after = {s.name: (sha256(s.images), sha256(s.labels)) for s in (rebuilt.id_train, *rebuilt.ood_sets())}
    assert after == before  # (its build time is a benchmark's business, not a test's: docs/BENCHMARKS.md)


def test_digits_are_sklearn_digits_in_order():
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(far_ood.sklearn_digit_images(), load_digits().images)
    originals = load_digits().images * (255.0 / 16.0)  # (1797, 8, 8)
    digits = far_ood.digits()
    # Shrinking each 28x28 image back to 8x8 must give its own source digit, not another one.
    shrunk = np.stack(
        [np.asarray(Image.fromarray(d.astype(np.float32)).resize((8, 8), Image.BILINEAR)) for d in digits]
    )
    errors = np.abs(shrunk - originals).mean(axis=(1, 2))
    assert errors.mean() < 0.1 * 255
    mismatched = np.abs(shrunk[:, None] - originals[None, :50]).mean(axis=(2, 3))  # (1797, 50)
    assert (errors[:50] < mismatched[:50].min(axis=1) + 1e-9).all()


def test_textures_are_textures_not_flat_crops():
    textures = far_ood.textures().reshape(2000, -1).astype(np.float64)
    stds = textures.std(axis=1)
    assert (stds > 3).mean() > 0.95
    assert len({row.tobytes() for row in far_ood.textures()}) == 2000


def test_noise_kinds_have_their_statistics():
    noise = far_ood.noise().astype(np.float64)
    gaussian, uniform, blobs = noise[:1000], noise[1000:2000], noise[2000:]

    def neighbour_correlation(images: np.ndarray) -> float:
        left, right = images[:, :, :-1].ravel(), images[:, :, 1:].ravel()
        return float(np.corrcoef(left, right)[0, 1])

    assert abs(uniform.mean() - 127.5) < 2 and abs(uniform.std() - 256 / np.sqrt(12)) < 2
    assert abs(gaussian.mean() - 127.5) < 2 and gaussian.std() > uniform.std() * 0.75
    assert abs(neighbour_correlation(gaussian)) < 0.05 and abs(neighbour_correlation(uniform)) < 0.05
    assert neighbour_correlation(blobs) > 0.8  # smoothed: neighbours agree
    assert (blobs.min(axis=(1, 2)) == 0).all() and (blobs.max(axis=(1, 2)) == 255).all()


def test_unknown_benchmark_names_the_known_ones(settings: Settings):
    with pytest.raises(ConfigError, match="benchmark must be one of") as error:
        load_benchmark("mnist-osr", settings)
    for name in BENCHMARKS:
        assert name in str(error.value)
    with pytest.raises(ConfigError, match="far-OOD set must be one of"):
        far_ood.load_far_ood("stripes")


def test_is_ood_is_the_negative_label_rule():
    assert is_ood(np.array([-1, 0, 5, -3])).tolist() == [True, False, False, True]
    assert bool(is_ood(OOD_LABEL)) and not bool(is_ood(0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "test"}, "kind"),
        ({"images": np.zeros((2, 28, 28), dtype=np.float32)}, "images"),
        ({"images": np.zeros((2, 28, 28, 4), dtype=np.uint8)}, "images"),
        ({"labels": np.zeros(3, dtype=np.int64)}, "labels"),
        ({"labels": np.zeros(2, dtype=np.int32)}, "labels"),
        ({"labels": np.array([0, OOD_LABEL], dtype=np.int64)}, "OOD labels"),
        ({"kind": "far"}, "must label every image -1"),
    ],
)
def test_image_set_refuses_bad_fields(kwargs: dict, field: str):
    values = {
        "name": "bad",
        "kind": "id",
        "images": np.zeros((2, 28, 28), np.uint8),
        "labels": np.zeros(2, np.int64),
    }
    with pytest.raises(ConfigError, match=field):
        ImageSet(**{**values, **kwargs})


def test_benchmark_refuses_mixed_image_shapes_and_kinds(bench: Benchmark):
    rgb = ImageSet("rgb", "far", np.zeros((2, 28, 28, 3), np.uint8), np.full(2, OOD_LABEL, np.int64))
    common = {
        "name": "b",
        "class_names": bench.class_names,
        "id_train": bench.id_train,
        "id_test": bench.id_test,
    }
    with pytest.raises(ConfigError, match="far set 'rgb' has images of shape"):
        Benchmark(**common, near=bench.near, far=(rgb,), mean=bench.mean, std=bench.std)
    with pytest.raises(ConfigError, match="near holds 'digits' of kind 'far'"):
        Benchmark(**common, near=bench.far[:1], far=(), mean=bench.mean, std=bench.std)
    with pytest.raises(ConfigError, match="mean and std need 1 values"):
        Benchmark(**common, near=bench.near, far=bench.far, mean=(0.1, 0.2), std=bench.std)


def test_builders_import_the_types_not_the_registry():
    # The registry imports the builders and the builders import the types: no cycle.
    def imported(module: str) -> set[str]:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    # types imports only the leaf image_files (ImageFiles), which imports nothing of the package.
    assert {name for name in imported("oal_shared.data.types") if name.startswith("oal_shared.data")} == {
        "oal_shared.data.image_files"
    }
    assert not {name for name in imported("oal_shared.data.image_files") if name.startswith("oal_shared.data")}
    for builder in ("oal_shared.data.cifar", "oal_shared.data.fmnist_osr", "oal_shared.data.folder"):
        assert "oal_shared.data.types" in imported(builder)
        assert "oal_shared.data.benchmark" not in imported(builder), f"{builder} imports the registry"
    from oal_shared.data.benchmark import Benchmark as ViaRegistry
    from oal_shared.data.types import Benchmark as ViaTypes

    assert ViaRegistry is ViaTypes
