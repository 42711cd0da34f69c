"""CIFAR benchmarks from an OpenOOD v1.5 layout, built as a tiny stand-in in tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from oal_shared.data import OOD_LABEL, DataFormatError, load_benchmark
from oal_shared.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, IMAGES_DIR, imglist_path
from oal_shared.errors import DataNotFoundError, UnsafePathError
from oal_shared.settings import Settings
from tests.utils.cifar_standin import write_cifar_standin


def test_cifar10_standin_loads_every_set(tmp_path: Path):
    standin = write_cifar_standin(tmp_path)

    bench = load_benchmark("cifar10", Settings(data_dir=tmp_path))

    assert bench.class_names == CIFAR10_CLASSES
    assert (bench.num_classes, bench.in_channels, bench.image_size) == (10, 3, 32)
    # PNG is lossless and the ID images are already 32x32: pixels come back exactly.
    np.testing.assert_array_equal(bench.id_train.images, standin.train_images)
    np.testing.assert_array_equal(bench.id_train.labels, standin.train_labels)
    np.testing.assert_array_equal(bench.id_test.images, standin.test_images)
    np.testing.assert_array_equal(bench.id_test.labels, standin.test_labels)
    assert [s.name for s in bench.near] == ["cifar100", "tin"]
    assert [s.name for s in bench.far] == ["mnist", "svhn", "texture", "places365"]
    for ood in bench.ood_sets():
        assert ood.images.shape == (standin.ood_counts[ood.name], 32, 32, 3)
        assert (ood.labels == OOD_LABEL).all()
        # Resizing (MNIST 28->32, textures 96x64 -> crop) and grey->RGB keep a constant image constant.
        assert (ood.images == standin.ood_levels[ood.name]).all(), ood.name


def test_cifar_mean_std_are_the_id_train_channel_stats(tmp_path: Path):
    standin = write_cifar_standin(tmp_path, per_class=3)
    bench = load_benchmark("cifar10", Settings(data_dir=tmp_path))

    pixels = standin.train_images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(bench.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bench.std, pixels.std(axis=0), rtol=1e-12)


def test_cifar_benchmark_is_cached_per_data_dir(tmp_path: Path):
    write_cifar_standin(tmp_path)
    first = load_benchmark("cifar10", Settings(data_dir=tmp_path))
    assert load_benchmark("cifar10", Settings(data_dir=tmp_path)) is first
    assert first.id_train.images.flags.writeable is False


def test_cifar100_near_sets_are_cifar10_and_tin(tmp_path: Path):
    standin = write_cifar_standin(tmp_path, benchmark="cifar100", classes=(0, 57, 99), per_class=1)
    bench = load_benchmark("cifar100", Settings(data_dir=tmp_path))

    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert bench.num_classes == 100
    assert [s.name for s in bench.near] == ["cifar10", "tin"]
    assert bench.id_test.labels.tolist() == standin.test_labels.tolist() == [0, 57, 99]


def test_absent_ood_set_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_cifar_standin(tmp_path, skip_sets=("tin", "places365"))
    with caplog.at_level(logging.WARNING, logger="oal_shared.data.cifar"):
        bench = load_benchmark("cifar10", Settings(data_dir=tmp_path))

    assert [s.name for s in bench.ood_sets()] == ["cifar100", "mnist", "svhn", "texture"]
    assert str(imglist_path(tmp_path, "cifar10", "test", "tin")) in caplog.text
    assert str(imglist_path(tmp_path, "cifar10", "test", "places365")) in caplog.text


def test_missing_id_list_names_the_expected_path(tmp_path: Path):
    write_cifar_standin(tmp_path)
    train_list = imglist_path(tmp_path, "cifar10", "train", "cifar10")
    train_list.unlink()

    with pytest.raises(DataNotFoundError, match=str(train_list)):
        load_benchmark("cifar10", Settings(data_dir=tmp_path))


def test_missing_image_names_the_image_path(tmp_path: Path):
    write_cifar_standin(tmp_path)
    missing = tmp_path / IMAGES_DIR / "cifar10" / "test" / "nowhere.png"
    test_list = imglist_path(tmp_path, "cifar10", "test", "cifar10")
    test_list.write_text(test_list.read_text() + "cifar10/test/nowhere.png 1\n")

    with pytest.raises(DataNotFoundError, match=str(missing)):
        load_benchmark("cifar10", Settings(data_dir=tmp_path))


def test_list_line_leaving_the_image_folder_is_refused(tmp_path: Path):
    write_cifar_standin(tmp_path)
    test_list = imglist_path(tmp_path, "cifar10", "test", "cifar10")
    test_list.write_text("../benchmark_imglist/cifar10/train_cifar10.txt 0\n")

    with pytest.raises(UnsafePathError, match="train_cifar10.txt"):
        load_benchmark("cifar10", Settings(data_dir=tmp_path))


@pytest.mark.parametrize(
    ("line", "fault"),
    [("cifar10/train/airplane/0000.png", "expected 'relative/path.png label'"), ("x.png cat", "'cat'")],
)
def test_malformed_list_line_names_file_and_line(tmp_path: Path, line: str, fault: str):
    write_cifar_standin(tmp_path)
    train_list = imglist_path(tmp_path, "cifar10", "train", "cifar10")
    train_list.write_text(train_list.read_text() + line + "\n")
    line_number = len(train_list.read_text().splitlines())

    with pytest.raises(DataFormatError, match=f"train_cifar10.txt line {line_number}:.*{fault}"):
        load_benchmark("cifar10", Settings(data_dir=tmp_path))


def test_id_label_outside_the_classes_is_refused(tmp_path: Path):
    write_cifar_standin(tmp_path)
    train_list = imglist_path(tmp_path, "cifar10", "train", "cifar10")
    first_image = train_list.read_text().split()[0]
    train_list.write_text(f"{first_image} 10\n")

    with pytest.raises(DataFormatError, match="ID label 10 is outside 0..9"):
        load_benchmark("cifar10", Settings(data_dir=tmp_path))
