"""The fit loop end to end on tiny slices: every recipe, exact repeats, resume, bad shards, the teacher cache."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oal_shared.errors import ConfigError, ShardError
from oal_shared.settings import Settings
from oal_trainer.checkpoint import CheckpointError, sha256_file
from oal_trainer.fit import FitHooks, fit
from oal_trainer.models import build_model
from oal_trainer.recipes import RECIPES
from oal_trainer.run import build_run
from oal_trainer.teacher import LoadedRun, cached_teacher_outputs
from tests.trainer.test_objective import RECIPE_TERMS
from tests.utils.trainer_runs import tiny_config, write_test_shards, write_tiny_vae

torch.set_num_threads(1)

RUN_FILES = (
    "config.json",
    "model.safetensors",
    "run.json",
    "metrics.json",
    "scores.csv",
    "results.csv",
    "roc.png",
    "score_hist.png",
)


@dataclass(frozen=True)
class World:
    root: Path
    settings: Settings
    shards: Path
    teacher: Path
    ce: Path
    student_inputs: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("fit")
    settings = Settings(artifact_dir=root / "artifacts", torch_threads=1)
    generator = write_tiny_vae(root / "generator")
    shards = write_test_shards(root / "shards", num_shards=2, per_shard=24, generator_dir=generator)
    fit(tiny_config("ce", seed=1), root / "teacher", settings=settings)
    fit(tiny_config("ce"), root / "ce", settings=settings)
    inputs = {"teacher_run": root / "teacher", "init_from": root / "ce", "shards": shards, "generator_dir": generator}
    return World(root, settings, shards, root / "teacher", root / "ce", inputs)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logged_terms(run_dir: Path) -> set[str]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return set(json.loads(lines[-1])) - {"epoch", "step", "lr", "samples_per_s", "loss"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_writes_a_complete_run_dir(world, recipe):
    run_dir = world.ce if recipe == "ce" else world.root / recipe
    if recipe != "ce":
        fit(tiny_config(recipe, **world.student_inputs), run_dir, settings=world.settings)
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{recipe}: {name} missing"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"] == recipe
    assert _logged_terms(run_dir) == RECIPE_TERMS[recipe]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["id_accuracy"] <= 1.0
    assert metrics["datasets"]["fmnist-id-test"]["num_images"] == 48
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 4 and info["train_images"] == 128
    if recipe != "ce":
        assert info["init_from"]["weights_sha256"] == sha256_file(world.ce / "model.safetensors")
        assert not _same_weights(_weights(run_dir), _weights(world.ce)), "fine-tuning changed nothing"
    if recipe in ("oal", "oal-energy", "latent-energy", "pixel-oe"):
        assert info["outliers"]["batches"] == 4 and info["outliers"]["latent_shape"] == [4, 8, 8]


def test_same_seed_gives_identical_weights_and_another_seed_does_not(world):
    config = tiny_config("oal", epochs=2, evaluate=False, **world.student_inputs)
    first = fit(config, world.root / "repeat-a", settings=world.settings)
    fit(config, world.root / "repeat-b", settings=world.settings)
    assert first.steps == 8
    assert _same_weights(_weights(world.root / "repeat-a"), _weights(world.root / "repeat-b"))
    other = config.model_copy(update={"seed": 7})
    fit(other, world.root / "repeat-c", settings=world.settings)
    assert not _same_weights(_weights(world.root / "repeat-a"), _weights(world.root / "repeat-c"))


class Killed(Exception):
    """Stands in for a process killed mid-epoch."""


def test_an_interrupted_run_resumes_from_its_last_epoch_and_matches(world):
    # Warm-up and a floor: the resumed schedule must continue, not restart or skip.
    config = tiny_config("oal", epochs=2, evaluate=False, warmup_steps=3, min_lr_ratio=0.2, **world.student_inputs)
    reference = world.root / "resume-reference"
    reference_lrs = []
    fit(config, reference, settings=world.settings, hooks=FitHooks(on_step=lambda i: reference_lrs.append(i.lr)))
    run_dir = world.root / "resume"

    def kill_in_second_epoch(info):
        if info.step == 6:  # 4 steps per epoch: two steps into epoch 2
            raise Killed

    with pytest.raises(Killed):
        fit(config, run_dir, settings=world.settings, hooks=FitHooks(on_step=kill_in_second_epoch))
    assert (run_dir / "checkpoints" / "last.safetensors").is_file()
    assert not (run_dir / "model.safetensors").exists()

    changed = config.model_copy(update={"lr": 0.123})
    with pytest.raises(CheckpointError, match="lr: 0.005 -> 0.123"):
        fit(changed, run_dir, settings=world.settings)

    seen = []
    resumed = fit(
        config, run_dir, settings=world.settings, hooks=FitHooks(on_step=lambda i: seen.append((i.step, i.lr)))
    )
    assert [step for step, _ in seen] == [5, 6, 7, 8], "resumes at the start of epoch 2"
    assert [lr for _, lr in seen] == reference_lrs[4:], "the lr schedule continues where it stood"
    assert reference_lrs[0] < reference_lrs[2] and reference_lrs[-1] < reference_lrs[3], "warm-up, then decay"
    assert resumed.steps == 8
    assert _same_weights(_weights(run_dir), _weights(reference))


def test_each_trained_part_has_its_own_peak_lr_and_floor(world):
    config = tiny_config("oal-energy", min_lr_ratio=0.1, **world.student_inputs)
    run = build_run(config, world.root / "lr-parts", world.settings)
    peaks = {name: optimizer.param_groups[0]["lr"] for name, optimizer in run.optimizers.items()}
    assert peaks == {
        "student": config.lr,
        "adapter": config.lr_adapter,
        "club_emb": config.lr_club,
        "club_latent": config.lr_club,
        "projector": config.lr_projector,
    }
    trained = [p for optimizer in run.optimizers.values() for p in optimizer.param_groups[0]["params"]]
    expected = [*run.student.parameters(), *run.objective.aux.parameters()]
    assert len(trained) == len(expected) and {id(p) for p in trained} == {id(p) for p in expected}
    for _ in range(run.total_steps):
        for name, optimizer in run.optimizers.items():
            optimizer.step()  # no gradients: nothing moves, the schedules advance
            run.schedulers[name].step()
    floors = {name: optimizer.param_groups[0]["lr"] for name, optimizer in run.optimizers.items()}
    assert floors == pytest.approx({name: 0.1 * peak for name, peak in peaks.items()})


def test_a_finished_run_dir_is_not_trained_over(world):
    with pytest.raises(ConfigError, match="already holds a finished run"):
        fit(tiny_config("ce"), world.ce, settings=world.settings)


def test_init_from_a_run_of_another_architecture_is_refused(world):
    with pytest.raises(ConfigError, match="init_from: .* holds a 'resnet_tiny' model"):
        fit(tiny_config("ce", model="resnet_small", init_from=world.ce), world.root / "x", settings=world.settings)


def test_init_from_a_missing_run_is_named(world):
    with pytest.raises(ConfigError, match="init_from: .*nowhere is not a directory"):
        fit(tiny_config("ce", init_from=world.root / "nowhere"), world.root / "y", settings=world.settings)


def _broken_copy(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    tar = dest / "outliers-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    return dest


def test_a_bad_shard_stops_the_run_naming_it(world):
    inputs = {**world.student_inputs, "shards": _broken_copy(world.shards, world.root / "bad-shards")}
    with pytest.raises(ShardError, match="outliers-000001.tar"):
        fit(tiny_config("oal", evaluate=False, **inputs), world.root / "bad-raise", settings=world.settings)


def test_a_bad_shard_is_skipped_and_counted_when_asked(world):
    inputs = {**world.student_inputs, "shards": _broken_copy(world.shards, world.root / "bad-shards-2")}
    config = tiny_config("oal", evaluate=False, on_bad_shard="skip", **inputs)
    fit(config, world.root / "bad-skip", settings=world.settings)
    outliers = json.loads((world.root / "bad-skip" / "run.json").read_text())["outliers"]
    assert outliers["skipped"] >= 1 and "outliers-000001.tar" in outliers["errors"][0]
    assert outliers["batches"] == 4


def test_teacher_cache_is_reused_and_keyed_by_the_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 6, 1).eval()
    images = torch.randn(10, 1, 28, 28)
    teacher = LoadedRun(tmp_path, model, "resnet_tiny", "ce", weights_sha256="a" * 64)
    kwargs = {"batch_size": 4, "device": torch.device("cpu"), "channels_last": False}
    first = cached_teacher_outputs(teacher, images, tmp_path / "cache", **kwargs)
    (cache_file,) = (tmp_path / "cache").iterdir()
    with torch.no_grad():
        logits, features = model(images, return_feature=True)
    torch.testing.assert_close(first.logits, logits)
    torch.testing.assert_close(first.features, features)

    model.head.weight.data.zero_()  # same key: the cache answers, not the changed model
    again = cached_teacher_outputs(teacher, images, tmp_path / "cache", **kwargs)
    torch.testing.assert_close(again.logits, first.logits)

    retrained = LoadedRun(tmp_path, model, "resnet_tiny", "ce", weights_sha256="b" * 64)
    fresh = cached_teacher_outputs(retrained, images, tmp_path / "cache", **kwargs)
    assert fresh.key != first.key
    assert torch.count_nonzero(fresh.logits - model.head.bias) == 0, "new weights, new outputs"
    assert len(list((tmp_path / "cache").iterdir())) == 2 and cache_file.exists()


def test_pixel_outliers_are_decoded_only_by_the_generator_that_made_them(world):
    other = write_tiny_vae(world.root / "other-generator", image_channels=3)
    config = tiny_config("pixel-oe", evaluate=False, **{**world.student_inputs, "generator_dir": other})
    with pytest.raises(ConfigError, match="generator_dir: .*other-generator has content hash"):
        fit(config, world.root / "pixel-other", settings=world.settings)


def test_pixel_outliers_can_be_decoded_batch_by_batch(world):
    cache_dir = world.root / "per-step-cache"
    config = tiny_config(
        "pixel-oe", pixel_decode="per_step", evaluate=False, cache_dir=cache_dir, **world.student_inputs
    )
    fit(config, world.root / "pixel-per-step", settings=world.settings)
    assert _logged_terms(world.root / "pixel-per-step") == RECIPE_TERMS["pixel-oe"]
    assert not list(cache_dir.glob("decoded-*")), "nothing decoded ahead of time"
