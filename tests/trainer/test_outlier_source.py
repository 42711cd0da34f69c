"""outlier_source=auto (memory for a small job, stream over OAL_OUTLIER_IN_MEMORY_MAX_MB), what a run
records of the choice, and resume keeping it. The readers' refusals are in tests/shared/test_shard_readers.py."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oal_shared.settings import Settings, get_settings
from oal_shared.shards import load_manifest
from oal_trainer.data import STREAM_DRAW, InMemoryOutliers, choose_outlier_source, held_bytes
from oal_trainer.fit import FitHooks, fit
from tests.utils.trainer_runs import tiny_config, write_test_shards

torch.set_num_threads(1)


@dataclass(frozen=True)
class World:
    root: Path
    shards: Path
    inputs: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("outlier-source")
    settings = Settings(artifact_dir=root / "artifacts", torch_threads=1)
    shards = write_test_shards(root / "shards", num_shards=2, per_shard=24)
    fit(tiny_config("ce", seed=1), root / "teacher", settings=settings)
    fit(tiny_config("ce"), root / "ce", settings=settings)
    return World(root, shards, {"teacher_run": root / "teacher", "init_from": root / "ce", "shards": shards})


def settings_with(world: World, limit_mb: int) -> Settings:
    return Settings(artifact_dir=world.root / "artifacts", torch_threads=1, outlier_in_memory_max_mb=limit_mb)


def outlier_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["outliers"]


# --- the choice ------------------------------------------------------------------------------------


def test_held_bytes_is_what_the_memory_source_holds(world):
    held = InMemoryOutliers(world.shards, batch_size=8, steps_per_epoch=1, seed=0).data
    tensors = held.latents.nbytes + held.embeddings.nbytes + held.classes.nbytes
    assert held_bytes(load_manifest(world.shards)) == tensors == 48 * ((4 * 8 * 8 + 64) * 4 + 8)


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OAL_OUTLIER_IN_MEMORY_MAX_MB", "3")
    get_settings.cache_clear()
    try:
        assert get_settings().outlier_in_memory_max_mb == 3
    finally:
        get_settings.cache_clear()
    assert Settings().outlier_in_memory_max_mb == 3  # read from the environment, not a constant


def test_choice_follows_the_limit_the_config_and_a_recorded_source(world, caplog):
    manifest = load_manifest(world.shards)  # 48 samples x 1288 B = 0.06 MB
    assert choose_outlier_source("auto", manifest, limit_mb=1).source == "memory"
    over = choose_outlier_source("auto", manifest, limit_mb=0)
    assert over.source == "stream" and "exceeds" in over.reason and "0.1 MB" in over.reason
    assert choose_outlier_source("memory", manifest, limit_mb=0).source == "memory", "an explicit config wins"
    assert choose_outlier_source("stream", manifest, limit_mb=256).source == "stream"
    with caplog.at_level(logging.WARNING, logger="oal_trainer.data.choice"):
        kept = choose_outlier_source("auto", manifest, limit_mb=256, recorded="stream")
    assert kept.source == "stream" and "keeps it on resume" in caplog.text


# --- runs ------------------------------------------------------------------------------------------


def test_auto_holds_a_small_job_in_memory_and_the_run_says_so(world, caplog):
    run_dir = world.root / "auto-memory"
    with caplog.at_level(logging.INFO, logger="oal_trainer.run"):
        fit(tiny_config("oal", evaluate=False, **world.inputs), run_dir, settings=settings_with(world, 256))
    record = outlier_record(run_dir)
    assert record["source"] == "memory"
    assert record["source_choice"]["configured"] == "auto" and record["source_choice"]["limit_mb"] == 256
    assert "memory (auto: 48 outliers" in caplog.text and "fits, held in memory" in caplog.text


def test_auto_streams_a_job_over_the_limit_and_the_run_says_so(world, caplog):
    run_dir = world.root / "auto-stream"
    with caplog.at_level(logging.INFO, logger="oal_trainer.run"):
        fit(tiny_config("oal", evaluate=False, **world.inputs), run_dir, settings=settings_with(world, 0))
    record = outlier_record(run_dir)
    assert record["source"] == "stream" and record["source_choice"]["limit_mb"] == 0
    assert record["samples_read"] >= 4 * 32, "the stream read the shards"
    assert "stream (auto: 48 outliers" in caplog.text and "streamed from the shards" in caplog.text


class Killed(Exception):
    """Stands in for a process killed mid-epoch."""


def _kill_at(step: int):
    def hook(info):
        if info.step == step:
            raise Killed

    return hook


def test_a_resumed_run_keeps_its_source_when_the_limit_changes(world, caplog):
    config = tiny_config("oal", epochs=2, evaluate=False, **world.inputs)
    reference = world.root / "resume-stream-reference"
    fit(config, reference, settings=settings_with(world, 0))
    run_dir = world.root / "resume-stream"
    with pytest.raises(Killed):
        fit(config, run_dir, settings=settings_with(world, 0), hooks=FitHooks(on_step=_kill_at(6)))
    assert json.loads((run_dir / "checkpoints" / "outlier_source.json").read_text())["source"] == "stream"

    with caplog.at_level(logging.WARNING):
        fit(config, run_dir, settings=settings_with(world, 256))  # the limit would now pick memory
    assert "the run started with stream and keeps it on resume" in caplog.text
    assert outlier_record(run_dir)["source"] == "stream"
    ref, resumed = load_file(str(reference / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "same outliers as the uninterrupted run"


def test_a_resume_without_a_record_chooses_again_and_warns(world, caplog):
    config = tiny_config("oal", epochs=2, evaluate=False, **world.inputs)
    run_dir = world.root / "resume-no-record"
    with pytest.raises(Killed):
        fit(config, run_dir, settings=settings_with(world, 256), hooks=FitHooks(on_step=_kill_at(6)))
    (run_dir / "checkpoints" / "outlier_source.json").unlink()
    with caplog.at_level(logging.WARNING):
        fit(config, run_dir, settings=settings_with(world, 256))
    assert "records no outlier source; choosing it again" in caplog.text
    assert outlier_record(run_dir)["source"] == "memory"


def test_a_streamed_run_resumes_with_other_reader_workers_and_draws_the_same(world):
    config = tiny_config("oal", epochs=2, evaluate=False, outlier_source="stream", **world.inputs)
    reference = world.root / "stream-workers-reference"
    fit(config, reference, settings=settings_with(world, 256))
    assert outlier_record(reference)["reader_workers"] == 0, "on the CPU the stream reads in the training process"
    run_dir = world.root / "stream-workers"
    with pytest.raises(Killed):
        fit(config, run_dir, settings=settings_with(world, 256), hooks=FitHooks(on_step=_kill_at(6)))
    in_a_worker = config.model_copy(update={"outlier_workers": 1})
    fit(in_a_worker, run_dir, settings=settings_with(world, 256))
    assert outlier_record(run_dir)["reader_workers"] == 1
    ref, resumed = load_file(str(reference / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "the draw does not depend on the reader workers"


def test_a_run_that_began_streaming_before_shard_blocks_is_told_its_draw_changed(world, caplog):
    config = tiny_config("oal", epochs=2, evaluate=False, outlier_source="stream", **world.inputs)
    run_dir = world.root / "stream-older-draw"
    with pytest.raises(Killed):
        fit(config, run_dir, settings=settings_with(world, 256), hooks=FitHooks(on_step=_kill_at(6)))
    path = run_dir / "checkpoints" / "outlier_source.json"
    record = json.loads(path.read_text())
    assert record["stream_draw"] == STREAM_DRAW
    del record["stream_draw"]  # what the version before shard blocks wrote
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        fit(config, run_dir, settings=settings_with(world, 256))
    assert "began streaming with the draw of the per-sample pipeline" in caplog.text
    assert json.loads(path.read_text())["stream_draw"] == STREAM_DRAW, "the record now says what the run draws"
