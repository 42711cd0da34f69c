"""IDX reading and the Fashion-MNIST loader: round trips, search order, errors, caching, the real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from oal_shared.data import fashion_mnist
from oal_shared.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist, split_file_names
from oal_shared.data.idx import read_idx, write_idx
from oal_shared.errors import ConfigError, DataFormatError, DataNotFoundError
from oal_shared.settings import DEBIAN_FMNIST_DIR, Settings


def isolated_settings(**values) -> Settings:
    """Settings from these values, so a developer's OAL_FMNIST_DIR or OAL_ALLOW_DOWNLOAD cannot leak in."""
    return Settings(**{"fmnist_dir": None, "allow_download": False, **values})


def write_fake_split(directory: Path, split: str, count: int, fill: int, gz: bool = True) -> None:
    """A tiny split whose images all hold `fill`, so a test can tell which folder was read."""
    directory.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = split_file_names(split)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{images_name}{suffix}", np.full((count, 28, 28), fill, dtype=np.uint8))
    write_idx(directory / f"{labels_name}{suffix}", np.arange(count, dtype=np.uint8) % 10)


# --- IDX ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_idx_round_trip_uint8(tmp_path: Path, name: str):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / name, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (5, 28, 28)
    np.testing.assert_array_equal(back, images)


def test_idx_round_trip_int32_and_gzip_told_by_content(tmp_path: Path):
    values = np.arange(-12, 12, dtype=np.int32).reshape(2, 3, 4)
    # Compressed but named without .gz: the reader goes by the gzip magic, not the name.
    path = write_idx(tmp_path / "values-idx", values, compress=True)
    back = read_idx(path)
    assert back.dtype == np.int32 and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def test_idx_header_is_big_endian_with_magic(tmp_path: Path):
    raw = write_idx(tmp_path / "labels", np.zeros(300, dtype=np.uint8)).read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 1])
    assert int.from_bytes(raw[4:8], "big") == 300


@pytest.mark.parametrize(
    ("payload", "fault"),
    [
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "two zero bytes"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "unknown type code 0x07"),
        (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"), "ends first"),
        (b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abc", "need 4 data bytes, found 3"),
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")[:-6], "gzip stream"),
    ],
)
def test_idx_malformed_file_names_file_and_fault(tmp_path: Path, payload: bytes, fault: str):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataFormatError, match=fault) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_idx_missing_file_is_data_not_found(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match="nothing-here"):
        read_idx(tmp_path / "nothing-here")


# --- where the loader looks -------------------------------------------------------------------------


@pytest.fixture
def no_debian_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Replace Debian's folder with an empty one, so only the folders a test sets up count."""
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FMNIST_DIR", empty)
    return empty


def test_configured_folder_comes_before_data_dir(tmp_path: Path, no_debian_copy: Path):
    write_fake_split(tmp_path / "configured", "test", count=4, fill=11)
    write_fake_split(tmp_path / "data" / "fashion-mnist", "test", count=6, fill=22, gz=False)

    images, labels = load_fashion_mnist(
        "test", isolated_settings(fmnist_dir=tmp_path / "configured", data_dir=tmp_path / "data")
    )
    assert images.shape == (4, 28, 28) and (images == 11).all()
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3]

    images, _ = load_fashion_mnist("test", isolated_settings(data_dir=tmp_path / "data"))
    assert images.shape == (6, 28, 28) and (images == 22).all()


def test_data_dir_comes_before_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_fake_split(tmp_path / "data" / "fashion-mnist", "train", count=3, fill=33)
    write_fake_split(tmp_path / "debian", "train", count=5, fill=44)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FMNIST_DIR", tmp_path / "debian")

    images, _ = load_fashion_mnist("train", isolated_settings(data_dir=tmp_path / "data"))
    assert (images == 33).all()
    images, _ = load_fashion_mnist("train", isolated_settings(data_dir=tmp_path / "elsewhere"))
    assert images.shape == (5, 28, 28) and (images == 44).all()


def test_a_folder_with_only_the_images_file_is_passed_over(tmp_path: Path, no_debian_copy: Path):
    write_fake_split(tmp_path / "configured", "test", count=4, fill=11)
    (tmp_path / "configured" / f"{split_file_names('test')[1]}.gz").unlink()
    write_fake_split(tmp_path / "data" / "fashion-mnist", "test", count=2, fill=55)

    images, _ = load_fashion_mnist(
        "test", isolated_settings(fmnist_dir=tmp_path / "configured", data_dir=tmp_path / "data")
    )
    assert (images == 55).all()


def test_nothing_found_names_every_folder_and_all_three_ways(tmp_path: Path, no_debian_copy: Path):
    settings = isolated_settings(
        fmnist_dir=tmp_path / "configured", data_dir=tmp_path / "data", allow_download=False
    )
    with pytest.raises(DataNotFoundError) as error:
        load_fashion_mnist("train", settings)
    message = str(error.value)
    for tried in (tmp_path / "configured", tmp_path / "data" / "fashion-mnist", no_debian_copy):
        assert str(tried) in message
    assert "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "OAL_FMNIST_DIR" in message
    assert "OAL_ALLOW_DOWNLOAD=1" in message


def test_allowed_download_is_used_last(tmp_path: Path, no_debian_copy: Path, monkeypatch: pytest.MonkeyPatch):
    # torchvision's network fetch stands in as a function that writes what it would have written.
    calls = []

    def fake_download(data_dir: Path) -> Path:
        calls.append(data_dir)
        write_fake_split(data_dir / fashion_mnist.TORCHVISION_SUBDIR, "test", count=2, fill=66, gz=False)
        return data_dir / fashion_mnist.TORCHVISION_SUBDIR

    monkeypatch.setattr(fashion_mnist, "_download_with_torchvision", fake_download)
    settings = isolated_settings(data_dir=tmp_path / "data", allow_download=True)
    images, _ = load_fashion_mnist("test", settings)
    assert (images == 66).all() and calls == [tmp_path / "data"]
    # A second call finds the earlier download among the searched folders and fetches nothing.
    load_fashion_mnist("test", settings)
    assert len(calls) == 1


def test_failed_download_is_named_in_the_error(
    tmp_path: Path, no_debian_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    def failing_download(data_dir: Path) -> Path:
        raise DataNotFoundError(f"the torchvision download into {data_dir} failed: no network")

    monkeypatch.setattr(fashion_mnist, "_download_with_torchvision", failing_download)
    with pytest.raises(
        DataNotFoundError, match="OAL_ALLOW_DOWNLOAD=1.*it is set, but the torchvision download"
    ):
        load_fashion_mnist("train", isolated_settings(data_dir=tmp_path / "data", allow_download=True))


def test_unknown_split_names_the_field():
    with pytest.raises(ConfigError, match="split must be one of .* got 'validation'"):
        load_fashion_mnist("validation")  # type: ignore[arg-type]


def test_label_count_mismatch_names_the_labels_file(tmp_path: Path, no_debian_copy: Path):
    folder = tmp_path / "configured"
    write_fake_split(folder, "test", count=4, fill=1)
    labels_file = folder / f"{split_file_names('test')[1]}.gz"
    write_idx(labels_file, np.zeros(3, dtype=np.uint8))

    with pytest.raises(DataFormatError, match="expected 4 labels") as error:
        load_fashion_mnist("test", isolated_settings(fmnist_dir=folder))
    assert str(labels_file) in str(error.value)


def test_loaded_arrays_are_cached_and_read_only(tmp_path: Path, no_debian_copy: Path):
    write_fake_split(tmp_path / "configured", "test", count=2, fill=7)
    settings = isolated_settings(fmnist_dir=tmp_path / "configured")
    images, labels = load_fashion_mnist("test", settings)
    again, _ = load_fashion_mnist("test", settings)
    assert again is images
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        labels[0] = 1


# --- the real data (Debian's dataset-fashion-mnist, which `make setup` installs) --------------------


def test_real_fashion_mnist_from_debian(tmp_path: Path):
    settings = isolated_settings(data_dir=tmp_path / "no-data-here")
    train_images, train_labels = load_fashion_mnist("train", settings)
    test_images, test_labels = load_fashion_mnist("test", settings)

    assert DEBIAN_FMNIST_DIR.is_dir()
    assert train_images.shape == (60_000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10_000, 28, 28)
    assert train_labels.dtype == np.int64 and test_labels.dtype == np.int64
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    assert np.bincount(train_labels).tolist() == [6000] * len(FMNIST_CLASSES)
    assert np.bincount(test_labels).tolist() == [1000] * len(FMNIST_CLASSES)
