"""Benchmarks from a benchmark file: class folders, image lists, and the bad input users bring."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from oal_shared.data import load_benchmark
from oal_shared.data.folder_spec import class_names_of, read_benchmark_file, resolve_benchmark_file
from oal_shared.data.image_files import ImageFiles
from oal_shared.data.types import channel_stats
from oal_shared.errors import ConfigError, DataFormatError, DataNotFoundError, UnsafePathError
from oal_shared.settings import Settings
from tests.utils.folder_benchmark import CLASS_NAMES, class_image, to_toml, write_folder_benchmark, write_png


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


def load(path: Path, data_dir: Path, **kwargs):
    return load_benchmark(str(path), Settings(data_dir=data_dir), **kwargs)


def test_folder_benchmark_matches_torchvision_image_folder(data_dir: Path):
    bench = load(write_folder_benchmark(data_dir), data_dir)
    reference = ImageFolder(str(data_dir / "shapes" / "train"))
    assert bench.class_names == tuple(reference.classes) == CLASS_NAMES
    assert list(bench.id_train.images.paths) == [path for path, _ in reference.samples]
    assert bench.id_train.labels.tolist() == reference.targets
    assert (bench.image_size, bench.in_channels) == (16, 3)
    assert [s.name for s in bench.ood_sets()] == ["shapes-near", "shapes-noise"]
    assert all(s.on_disk for s in (bench.id_train, bench.id_test, *bench.ood_sets()))
    # Decoded on access, pixel for pixel what the PNG holds.
    first, image = reference.samples[5][0], bench.id_train.images[5]
    assert np.array_equal(image, np.asarray(Image.open(first)))
    batch = bench.id_train.images[2:7]
    assert batch.shape == (5, 16, 16, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[3], image)


def test_json_and_toml_give_the_same_benchmark(data_dir: Path):
    toml_bench = load(write_folder_benchmark(data_dir), data_dir)
    json_bench = load(write_folder_benchmark(data_dir, file_format="json"), data_dir)
    assert np.array_equal(toml_bench.id_train.images.paths, json_bench.id_train.images.paths)
    assert toml_bench.mean == json_bench.mean and toml_bench.std == json_bench.std


def test_mean_std_are_the_id_train_pixel_stats(data_dir: Path):
    bench = load(write_folder_benchmark(data_dir), data_dir)
    pixels = bench.id_train.images[np.arange(len(bench.id_train))].astype(np.float64) / 255.0
    assert np.allclose(bench.mean, pixels.mean(axis=(0, 1, 2)))
    assert np.allclose(bench.std, pixels.std(axis=(0, 1, 2)))
    assert channel_stats(bench.id_train.images) == channel_stats(pixels_uint8 := bench.id_train.images[:])
    assert pixels_uint8.shape[0] == len(bench.id_train)


def test_resize_and_grey(data_dir: Path):
    rng = np.random.default_rng(1)
    path = write_folder_benchmark(data_dir, size=20, channels=1, extra={"image_size": 12})
    write_png(data_dir / "shapes" / "train" / "circle" / "wide.png", rng.integers(0, 255, (10, 30), dtype=np.uint8))
    bench = load(path, data_dir)
    assert (bench.image_size, bench.in_channels) == (12, 1)
    assert bench.id_train.images[:4].shape == (4, 12, 12)
    assert len(bench.mean) == 1


def test_subset_decodes_nothing_and_fingerprint_follows_the_files(data_dir: Path):
    bench = load(write_folder_benchmark(data_dir), data_dir)
    files = bench.id_train.images
    part = files.subset(np.array([4, 1]))
    assert isinstance(part, ImageFiles) and list(part.paths) == [files.paths[4], files.paths[1]]
    before = part.fingerprint()
    os.utime(part.paths[0], ns=(1, 1))
    assert part.fingerprint() != before


def test_image_lists_openood_style(data_dir: Path):
    rng = np.random.default_rng(2)
    lines = {"train": [], "test": [], "ood": []}
    for split in lines:
        for index in range(12):
            label = index % 2
            write_png(data_dir / "imgs" / split / f"{index}.png", class_image(rng, label, 8, 3))
            lines[split].append(f"{split}/{index}.png {label}")
    for split, entries in lines.items():
        (data_dir / f"{split}.txt").write_text("\n".join(entries) + "\n")
    spec = {
        "class_names": ["red", "green"],
        "id_train": {"list": "train.txt", "root": "imgs"},
        "id_test": {"list": "test.txt", "root": "imgs"},
        "far": [{"list": "ood.txt", "root": "imgs", "name": "ood"}],
    }
    (data_dir / "lists.json").write_text(json.dumps(spec))
    bench = load(data_dir / "lists.json", data_dir)
    assert bench.class_names == ("red", "green")
    assert bench.id_train.labels.tolist() == [i % 2 for i in range(12)]
    assert bench.far[0].labels.tolist() == [-1] * 12
    assert class_names_of(read_benchmark_file(data_dir / "lists.json"), data_dir, data_dir / "lists.json") == (
        "red",
        "green",
    )


# ---------------------------------------------------------------------------- bad input


def test_errors_name_the_file_and_the_key(data_dir: Path):
    path = write_folder_benchmark(data_dir, extra={"channels": 2, "colour": "yes"})
    with pytest.raises(ConfigError) as caught:
        load(path, data_dir)
    message = str(caught.value)
    assert str(path) in message and "channels:" in message and "colour:" in message
    (data_dir / "two.toml").write_text(to_toml({"id_train": {"folder": "a"}, "id_test": {"list": "b", "folder": "c"}}))
    with pytest.raises(ConfigError, match=r"two.toml: id_test: needs exactly one of the keys folder or list"):
        load(data_dir / "two.toml", data_dir)
    (data_dir / "no-ood.toml").write_text(to_toml({"id_train": {"folder": "a"}, "id_test": {"folder": "c"}}))
    with pytest.raises(ConfigError, match=r"no-ood.toml: \(top level\): needs at least one OOD set"):
        load(data_dir / "no-ood.toml", data_dir)
    (data_dir / "broken.toml").write_text("id_train = [")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load(data_dir / "broken.toml", data_dir)


def test_an_empty_class_folder_is_named(data_dir: Path):
    path = write_folder_benchmark(data_dir)
    empty = data_dir / "shapes" / "test" / "square"
    for png in empty.iterdir():
        png.unlink()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataNotFoundError, match=rf"id_test.folder: class folder\(s\) {empty} hold no images"):
        load(path, data_dir)


def test_test_classes_must_match_train_classes(data_dir: Path):
    path = write_folder_benchmark(data_dir)
    write_png(data_dir / "shapes" / "test" / "triangle" / "0.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"id_test.folder: .*missing \[\], extra \['triangle'\]"):
        load(path, data_dir)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_is_fatal_by_default(data_dir: Path):
    path = write_folder_benchmark(data_dir)
    bad = data_dir / "shapes" / "train" / "stripe" / "0003.png"
    _truncate(bad)
    with pytest.raises(DataFormatError, match=rf"id_train: image {bad} cannot be read .*on_bad_image = .skip."):
        load(path, data_dir)


def test_unreadable_images_are_skipped_and_counted_on_request(data_dir: Path, caplog):
    path = write_folder_benchmark(data_dir, folder="skips", extra={"on_bad_image": "skip"})
    truncated = data_dir / "skips" / "train" / "stripe" / "0003.png"
    _truncate(truncated)
    garbage = data_dir / "skips" / "far" / "sub0" / "0000.png"
    garbage.write_bytes(b"this is not a png")
    bench = load(path, data_dir)
    assert bench.id_train.skipped_files == (str(truncated),)
    assert len(bench.id_train) == 3 * 20 - 1
    assert str(truncated) not in set(bench.id_train.images.paths)
    assert bench.far[0].skipped_files == (str(garbage),) and len(bench.far[0]) == 11
    assert "1 unreadable image(s) skipped" in caplog.text


def test_mixed_sizes_need_image_size(data_dir: Path):
    path = write_folder_benchmark(data_dir)
    odd = write_png(data_dir / "shapes" / "near" / "odd.png", np.zeros((24, 24, 3), np.uint8))
    expected = rf"image_size: images come in 2 sizes, .*24x24 \({odd}\).*set image_size"
    with pytest.raises(DataFormatError, match=expected):
        load(path, data_dir)


def test_non_square_images_need_image_size(data_dir: Path):
    path = write_folder_benchmark(data_dir, size=16)
    for png in (data_dir / "shapes").rglob("*.png"):
        Image.open(png).crop((0, 0, 16, 10)).save(png)
    with pytest.raises(DataFormatError, match="16x10, not square; set image_size"):
        load(path, data_dir)


def test_paths_outside_the_data_root_are_refused(data_dir: Path, tmp_path: Path):
    write_folder_benchmark(tmp_path / "elsewhere")
    path = write_folder_benchmark(data_dir, extra={"far": [{"folder": "../elsewhere/shapes/far"}]})
    with pytest.raises(UnsafePathError, match=r"far\[0\].folder: .*'\.\.'"):
        load(path, data_dir)
    path = write_folder_benchmark(data_dir, extra={"near": [{"folder": str(tmp_path / "elsewhere" / "shapes")}]})
    with pytest.raises(UnsafePathError, match=r"near\[0\].folder: .*absolute"):
        load(path, data_dir)
    # A symlink inside the root that leads out of it.
    path = write_folder_benchmark(data_dir, folder="linked")
    (data_dir / "linked" / "far" / "out").symlink_to(tmp_path / "elsewhere" / "shapes" / "far")
    with pytest.raises(UnsafePathError, match=r"far\[0\]: .* outside the data root"):
        load(path, data_dir)


def test_a_job_names_its_benchmark_file_inside_the_data_root(data_dir: Path, tmp_path: Path):
    outside = write_folder_benchmark(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError):
        resolve_benchmark_file(str(outside), data_dir, confined=True)
    with pytest.raises(UnsafePathError):
        load_benchmark("../elsewhere/shapes.toml", Settings(data_dir=data_dir), confined=True)
    with pytest.raises(DataNotFoundError, match="benchmark file nope.toml does not exist"):
        resolve_benchmark_file("nope.toml", data_dir, confined=True)
    inside = write_folder_benchmark(data_dir)
    assert resolve_benchmark_file("shapes.toml", data_dir, confined=True) == inside.resolve()
    # The trainer's own command line may point at a file anywhere; its paths still stay in the root.
    assert resolve_benchmark_file(str(outside), data_dir, confined=False) == outside
