"""ID images streamed through DataLoader workers: the same batches, weights, caches and scores as held ones."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oal_shared.data import load_benchmark
from oal_shared.settings import Settings
from oal_trainer.data import StreamedImages, id_loader, id_train_set, slice_benchmark
from oal_trainer.evaluate import evaluate_model
from oal_trainer.fit import FitHooks, fit
from oal_trainer.teacher import cached_teacher_outputs, load_teacher
from tests.utils.folder_benchmark import write_folder_benchmark
from tests.utils.trainer_runs import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    bench_file = write_folder_benchmark(root / "data", train_per_class=40, test_per_class=10, size=16)
    held = Settings(data_dir=root / "data", artifact_dir=root / "artifacts", torch_threads=1)
    streamed = held.model_copy(update={"id_in_memory_max_mb": 0, "id_stream_workers": 2})
    return root, bench_file, held, streamed


@pytest.fixture(scope="module")
def bench(world):
    _, bench_file, held, _ = world
    return load_benchmark(str(bench_file), held)


def _config(bench_file: Path, **overrides):
    values = {"benchmark": str(bench_file), "train_subset": 96, "batch_size": 16, "epochs": 2, "evaluate": False}
    return tiny_config("ce", **{**values, **overrides})


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_streamed_batches_are_the_held_batches(bench, rank, world_size):
    held = id_train_set(bench, 90, seed=3)
    streamed = id_train_set(bench, 90, seed=3, in_memory_max_bytes=0, stream_workers=2)
    assert isinstance(streamed.images, StreamedImages) and not held.streamed
    assert streamed.images.shape == tuple(held.images.shape)
    for epoch in (0, 1):
        pairs = zip(
            id_loader(held, 16, seed=5, epoch=epoch, rank=rank, world_size=world_size),
            id_loader(streamed, 16, seed=5, epoch=epoch, rank=rank, world_size=world_size),
            strict=True,
        )
        for (x_held, y_held, rows_held), (x_streamed, y_streamed, rows_streamed) in pairs:
            assert torch.equal(x_held, x_streamed)
            assert torch.equal(y_held, y_streamed) and torch.equal(rows_held, rows_streamed)


def test_the_threshold_chooses_and_the_log_says_which(bench, caplog):
    tensor_bytes = 60 * 3 * 16 * 16 * 4
    with caplog.at_level(logging.INFO, logger="oal_trainer.data.id_images"):
        assert not id_train_set(bench, 60, 0, in_memory_max_bytes=tensor_bytes).streamed
        assert "held in memory" in caplog.text
        caplog.clear()
        assert id_train_set(bench, 60, 0, in_memory_max_bytes=tensor_bytes - 1).streamed
        assert "streamed by DataLoader workers" in caplog.text and "files on disk" in caplog.text


def test_a_streamed_fit_trains_the_held_weights_and_resumes_exactly(world):
    root, bench_file, held, streamed = world
    config = _config(bench_file)
    fit(config, root / "held", settings=held)
    fit(config, root / "streamed", settings=streamed)
    reference = load_file(str(root / "held" / "model.safetensors"))
    weights = load_file(str(root / "streamed" / "model.safetensors"))
    assert all(torch.equal(reference[k], weights[k]) for k in reference)

    class Killed(Exception):
        pass

    def kill(info):
        if info.step == 8:  # 6 steps per epoch: two into the second
            raise Killed

    with pytest.raises(Killed):
        fit(config, root / "resumed", settings=streamed, hooks=FitHooks(on_step=kill))
    fit(config, root / "resumed", settings=streamed)
    resumed = load_file(str(root / "resumed" / "model.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_the_teacher_cache_streams_and_follows_the_files(world, bench, caplog):
    root, bench_file, held, _ = world
    teacher_dir = root / "teacher"
    fit(_config(bench_file, epochs=1), teacher_dir, settings=held)
    teacher = load_teacher(teacher_dir, bench.num_classes, bench.in_channels)
    common = {"batch_size": 32, "device": torch.device("cpu"), "channels_last": False}
    in_memory = cached_teacher_outputs(teacher, id_train_set(bench, 96, 1).images, root / "cache-held", **common)
    images = id_train_set(bench, 96, 1, in_memory_max_bytes=0, stream_workers=2).images
    streamed = cached_teacher_outputs(teacher, images, root / "cache", **common)
    assert torch.allclose(streamed.logits, in_memory.logits, atol=1e-6)
    assert torch.allclose(streamed.features, in_memory.features, atol=1e-6)
    with caplog.at_level(logging.INFO, logger="oal_trainer.teacher"):
        again = cached_teacher_outputs(teacher, images, root / "cache", **common)
    assert again.key == streamed.key and "read from cache" in caplog.text
    os.utime(images.images.paths[images.rows[0]], ns=(7, 7))  # a changed file is a changed data set
    changed = StreamedImages(images.images, images.rows, images.mean, images.std)
    assert cached_teacher_outputs(teacher, changed, root / "cache", **common).key != streamed.key


def test_evaluation_streams_the_files_and_scores_as_held(world, bench):
    root, bench_file, held, _ = world
    run_dir = root / "eval-model"
    fit(_config(bench_file, epochs=1), run_dir, settings=held)
    model = load_teacher(run_dir, bench.num_classes, bench.in_channels).model
    sliced = slice_benchmark(bench, 20, seed=0)
    assert sliced.id_test.on_disk and len(sliced.id_test) == 20

    def held_set(image_set):
        return replace(image_set, images=image_set.images[:])  # decoded once into a uint8 array

    in_memory = replace(
        sliced,
        id_test=held_set(sliced.id_test),
        near=tuple(map(held_set, sliced.near)),
        far=tuple(map(held_set, sliced.far)),
    )
    from_files = evaluate_model(model, sliced, batch_size=8)
    from_arrays = evaluate_model(model, in_memory, batch_size=8)
    for a, b in zip(from_files.sets, from_arrays.sets, strict=True):
        assert a.name == b.name and (a.preds == b.preds).all()
        assert all((a.scores[name] == b.scores[name]).all() for name in a.scores)
