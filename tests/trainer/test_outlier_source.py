"""outlier_source=auto (memory for a small job, stream over OAL_OUTLIER_IN_MEMORY_MAX_MB), what a run
records of the choice, resume keeping it; and the fast local tar reader refusing what WebDataset's did."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from oal_shared.errors import ShardError
from oal_shared.settings import Settings, get_settings
from oal_shared.shards import ReadStats, SampleLayout, iter_outlier_samples, load_manifest, sample_key, write_shard
from oal_shared.shards import reader as shard_reader
from oal_trainer.data import InMemoryOutliers, choose_outlier_source, held_bytes
from oal_trainer.fit import FitHooks, fit
from tests.utils.shards import make_outlier_samples
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


# --- the fast tar reader refuses what WebDataset's reader refused ----------------------------------


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def members_of(sample) -> dict[str, bytes]:
    return {
        "latent.npy": npy(sample.latent),
        "emb.npy": npy(sample.embedding),
        "cls": str(sample.cls).encode(),
        "json": json.dumps({**sample.meta, "schema_version": 1}).encode(),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], tar_format=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for key, members in samples:
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def spoil(name: str, members: dict[str, bytes], sample) -> dict[str, bytes]:
    """One kind of bad sample, made from good members."""
    spoiled = dict(members)
    if name == "missing member":
        del spoiled["emb.npy"]
    elif name == "float64 latent":
        spoiled["latent.npy"] = npy(sample.latent.astype(np.float64))
    elif name == "pickled npy":
        spoiled["latent.npy"] = npy(np.array([{"evil": 1}], dtype=object))
    elif name == "short npy payload":  # same header as the good sample before it: the cached-header path
        spoiled["latent.npy"] = members["latent.npy"][:-10]
    elif name == "not an npy":
        spoiled["emb.npy"] = b"hello"
    elif name == "non-finite latent":
        latent = sample.latent.copy()
        latent[0, 0, 0] = np.inf
        spoiled["latent.npy"] = npy(latent)
    elif name == "2-d embedding":
        spoiled["emb.npy"] = npy(sample.embedding.reshape(8, 8))
    elif name == "other layout":
        spoiled["latent.npy"] = npy(np.zeros((4, 4, 4), np.float16))
    elif name == "bad cls":
        spoiled["cls"] = b"three"
    elif name == "negative cls":
        spoiled["cls"] = b"-1"
    elif name == "bad json":
        spoiled["json"] = b"{not json"
    elif name == "json list":
        spoiled["json"] = b"[1, 2]"
    elif name == "schema version":
        spoiled["json"] = json.dumps({**sample.meta, "schema_version": 9}).encode()
    elif name == "NaN in meta":
        spoiled["json"] = json.dumps({**sample.meta, "x": float("nan"), "schema_version": 1}).encode()
    elif name == "overflowing float in meta":
        spoiled["json"] = json.dumps({**sample.meta, "schema_version": 1})[:-1].encode() + b', "x": 1e999}'
    return spoiled


BAD_SAMPLES = [
    "missing member",
    "float64 latent",
    "pickled npy",
    "short npy payload",
    "not an npy",
    "non-finite latent",
    "2-d embedding",
    "other layout",
    "bad cls",
    "negative cls",
    "bad json",
    "json list",
    "schema version",
    "NaN in meta",
    "overflowing float in meta",
]


def read_both(monkeypatch, urls, **kwargs) -> tuple[object, object]:
    """(ours, WebDataset's) result of iter_outlier_samples: the keys read, or the error text."""
    results = []
    for local in (True, False):
        monkeypatch.setattr(shard_reader, "_is_local", lambda url, local=local: local)
        try:
            results.append([sample.key for sample in iter_outlier_samples(urls, **kwargs)])
        except ShardError as exc:
            results.append(str(exc))
    monkeypatch.undo()
    return results[0], results[1]


@pytest.mark.parametrize("kind", BAD_SAMPLES)
def test_each_bad_sample_is_refused_by_both_readers(tmp_path, monkeypatch, kind):
    samples = make_outlier_samples(3)
    bad = 1
    rows = [(s.key, members_of(s) if i != bad else spoil(kind, members_of(s), s)) for i, s in enumerate(samples)]
    path = write_tar(tmp_path / "outliers-000000.tar", rows)
    layout = SampleLayout.of(samples[0].latent, samples[0].embedding)
    ours, theirs = read_both(monkeypatch, [path], layout=layout)
    assert isinstance(ours, str) and f"key {samples[bad].key}" in ours, ours
    assert isinstance(theirs, str) and f"key {samples[bad].key}" in theirs, theirs
    assert ours == theirs, "the same refusal, word for word (the decoding after the tar reader is shared)"
    if kind in ("NaN in meta", "overflowing float in meta"):  # refused when parsed, not by re-encoding
        assert "json: not valid JSON" in ours
    stats = ReadStats()
    skipped = [s.key for s in iter_outlier_samples([path], on_error="skip", stats=stats, layout=layout)]
    assert skipped == [samples[0].key, samples[2].key] and stats.skipped == 1


def _cut(path: Path, at: int) -> Path:
    path.write_bytes(path.read_bytes()[:at])
    return path


@pytest.mark.parametrize("where", ["inside data", "inside a header"])
def test_a_truncated_shard_is_refused_by_both_readers(tmp_path, monkeypatch, where):
    samples = make_outlier_samples(4)
    path = write_tar(tmp_path / "outliers-000000.tar", [(s.key, members_of(s)) for s in samples])
    with tarfile.open(path) as tar:
        member = tar.getmembers()[9]  # the second member of sample 2
    _cut(path, member.offset_data + 5 if where == "inside data" else member.offset + 100)
    ours, theirs = read_both(monkeypatch, [path])
    assert re.search(rf"shard {re.escape(str(path))}: unreadable tar .*unexpected end of data", ours), ours
    if where == "inside data":
        assert ours == theirs
    else:  # tarfile ends the archive quietly at a cut header; the half sample before it was refused
        assert f"key {samples[2].key}: missing member emb.npy" in theirs
    stats = ReadStats()
    assert [s.key for s in iter_outlier_samples([path], on_error="skip", stats=stats)] == [s.key for s in samples[:2]]
    assert stats.skipped == 1


def test_a_bad_header_checksum_is_refused(tmp_path, monkeypatch):
    samples = make_outlier_samples(3)
    path = write_tar(tmp_path / "outliers-000000.tar", [(s.key, members_of(s)) for s in samples])
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4].offset  # the first header of sample 1
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x01  # one bit of the member name
    path.write_bytes(bytes(data))
    ours, theirs = read_both(monkeypatch, [path])
    assert re.search(r"unreadable tar \(ReadError: bad checksum\)", ours), ours
    # tarfile ends the archive silently at a bad header after the first: one sample, no error.
    assert theirs == [samples[0].key]


def test_a_duplicate_member_is_refused(tmp_path, monkeypatch):
    sample = make_outlier_samples(1)[0]
    members = members_of(sample)
    path = tmp_path / "outliers-000000.tar"
    with tarfile.open(path, "w") as tar:
        for member, data in [*members.items(), ("cls", b"1")]:
            info = tarfile.TarInfo(f"{sample.key}.{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours, theirs = read_both(monkeypatch, [path])
    assert "duplicate file name in tar file cls" in ours and "duplicate file name in tar file cls" in theirs


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_keys_read_the_same_in_every_tar_format(tmp_path, monkeypatch, tar_format):
    # 190-character keys: names over tar's 100 bytes go to pax, GNU long-name or ustar prefix fields.
    samples = make_outlier_samples(3)
    keys = [sample_key("j" * 160, s.cls, i, 0) for i, s in enumerate(samples)]
    if tar_format == tarfile.USTAR_FORMAT:  # ustar splits names at a slash only: keep them in a folder
        keys = [f"{'d' * 90}/{key[-80:]}" for key in keys]
    path = write_tar(
        tmp_path / "outliers-000000.tar", list(zip(keys, map(members_of, samples), strict=True)), tar_format
    )
    ours, theirs = read_both(monkeypatch, [path])
    if tar_format == tarfile.USTAR_FORMAT:  # a key with a slash is no sample key: the same refusal
        assert ours == theirs and isinstance(ours, str) and keys[0] in ours
    else:
        assert ours == theirs == keys


def test_the_real_writer_round_trips_through_both_readers(tmp_path, monkeypatch):
    samples = make_outlier_samples(5, job_id="j" * 150)  # pax names
    info = write_shard(tmp_path, 0, samples)
    ours, theirs = read_both(monkeypatch, [tmp_path / info.name])
    assert ours == theirs == [s.key for s in samples]
    read = list(iter_outlier_samples([tmp_path / info.name]))
    for got, wrote in zip(read, samples, strict=True):
        assert np.array_equal(got.latent, wrote.latent) and got.latent.dtype == wrote.latent.dtype
        assert np.array_equal(got.embedding, wrote.embedding) and got.meta == wrote.meta and got.cls == wrote.cls
        assert got.latent.flags.writeable, "a copy, as numpy's reader gives"


def test_the_training_stream_draws_the_same_outliers_with_either_tar_reader(world, monkeypatch):
    from oal_trainer.data import OutlierStream

    draws = []
    for local in (True, False):
        monkeypatch.setattr(shard_reader, "_is_local", lambda url, local=local: local)
        stream = OutlierStream(world.shards, batch_size=8, steps_per_epoch=9, seed=3, shuffle_buffer=16)
        draws.append([(batch.keys, batch.latents) for batch in stream.epoch(1)])
    monkeypatch.undo()
    assert [keys for keys, _ in draws[0]] == [keys for keys, _ in draws[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(draws[0], draws[1], strict=True))
