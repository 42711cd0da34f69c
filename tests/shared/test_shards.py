"""Outlier shards on disk: written atomically and deterministically, read by webdataset and tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from oal_shared import fsio
from oal_shared.errors import ConfigError, ManifestError, ShardError
from oal_shared.shards import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    OutlierSample,
    ReadStats,
    SampleLayout,
    decode_outlier_sample,
    describe_shard,
    iter_outlier_samples,
    list_shards,
    load_manifest,
    outlier_pipeline,
    read_manifest,
    sample_key,
    shard_name,
    verify_shards,
    write_manifest,
    write_shard,
)
from tests.utils.shards import TEST_GENERATOR, make_outlier_samples, write_outlier_shards


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def write_raw_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A tar written member by member with plain tarfile, for shards our writer would refuse."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for member, data in sorted(sample.items()):
                if member == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def raw_members(sample: OutlierSample) -> dict[str, bytes]:
    return {
        "__key__": sample.key,
        "latent.npy": npy(sample.latent),
        "emb.npy": npy(sample.embedding),
        "cls": str(sample.cls).encode(),
        "json": json.dumps({**sample.meta, "schema_version": 1}).encode(),
    }


def truncate_inside_member(path: Path, member_index: int) -> Path:
    """Cut the shard in the middle of the data of its `member_index`-th member."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])
    return path


def keys_of(samples) -> list[str]:
    return [sample.key for sample in samples]


# --- writing -------------------------------------------------------------------------------------


def test_round_trip_through_plain_webdataset(tmp_path: Path):
    samples = make_outlier_samples(6)
    info = write_shard(tmp_path, 0, samples)
    url = str(tmp_path / info.name)
    read = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert [raw["__key__"] for raw in read] == keys_of(samples)
    for raw, sample in zip(read, samples, strict=True):
        latent = np.load(io.BytesIO(raw["latent.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(latent, sample.latent)
        assert latent.dtype == np.float16
        np.testing.assert_array_equal(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False), sample.embedding)
        assert int(raw["cls"]) == sample.cls
        assert json.loads(raw["json"]) == {**sample.meta, "schema_version": 1}


def test_round_trip_through_our_reader_keeps_float32_latents(tmp_path: Path):
    samples = make_outlier_samples(5, latent_shape=(3, 4, 5), dim=7, latent_dtype=np.float32)
    info = write_shard(tmp_path, 3, samples)
    assert info.name == "outliers-000003.tar" == shard_name(3)
    stats = ReadStats()
    read = list(iter_outlier_samples([tmp_path / info.name], stats=stats))
    assert keys_of(read) == keys_of(samples)
    for got, want in zip(read, samples, strict=True):
        assert got.latent.dtype == np.float32 and got.latent.shape == (3, 4, 5)
        np.testing.assert_array_equal(got.latent, want.latent)
        np.testing.assert_array_equal(got.embedding, want.embedding)
        assert (got.cls, got.meta) == (want.cls, want.meta)
    assert (stats.samples, stats.skipped, stats.errors) == (5, 0, [])


def test_member_names_seen_by_plain_tarfile(tmp_path: Path):
    samples = make_outlier_samples(3)
    info = write_shard(tmp_path, 0, samples)
    with tarfile.open(tmp_path / info.name) as tar:
        names = tar.getnames()
        assert all(member.mtime == 0 for member in tar.getmembers())
    expected = [f"{s.key}.{m}" for s in samples for m in ("cls", "emb.npy", "json", "latent.npy")]
    assert names == expected


def test_shard_info_matches_the_file_on_disk(tmp_path: Path):
    info = write_shard(tmp_path, 0, make_outlier_samples(4))
    data = (tmp_path / info.name).read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.bytes == len(data)
    assert info.count == 4
    assert describe_shard(tmp_path / info.name) == info


def test_same_samples_give_identical_bytes(tmp_path: Path):
    first = write_shard(tmp_path / "a", 0, make_outlier_samples(4, seed=3))
    second = write_shard(tmp_path / "b", 0, make_outlier_samples(4, seed=3))
    assert (tmp_path / "a" / first.name).read_bytes() == (tmp_path / "b" / second.name).read_bytes()
    other = write_shard(tmp_path / "c", 0, make_outlier_samples(4, seed=4))
    assert other.sha256 != first.sha256


def test_no_temp_file_is_left_and_list_shards_ignores_hidden_ones(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=3)
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "outliers-000000.tar", "outliers-000001.tar"]
    (tmp_path / ".outliers-000002.tar.123.abcd.tmp").write_bytes(b"half a shard")
    (tmp_path / "outliers-2.tar").write_bytes(b"not our name")
    assert [path.name for path in list_shards(tmp_path)] == ["outliers-000000.tar", "outliers-000001.tar"]
    assert list_shards(tmp_path / "absent") == []


def test_dotted_key_is_refused_when_the_sample_is_built():
    good = make_outlier_samples(1)[0]
    with pytest.raises(ShardError, match=r"key a\.b: key: expected 1-200 letters.*got 'a\.b'"):
        OutlierSample("a.b", good.latent, good.embedding, good.cls, good.meta)


def test_sample_spoiled_after_construction_makes_write_fail_with_no_file(tmp_path: Path):
    samples = make_outlier_samples(4)
    samples[2].latent[0, 0, 0] = np.nan  # arrays stay mutable; the writer checks again
    with pytest.raises(ShardError, match=f"shard outliers-000000.tar, key {samples[2].key}: latent: 1 non-finite"):
        write_shard(tmp_path, 0, samples)
    assert os.listdir(tmp_path) == []


def test_duplicate_keys_make_write_fail_with_no_file(tmp_path: Path):
    samples = make_outlier_samples(3)
    samples.append(samples[1])
    with pytest.raises(ShardError, match=r"duplicate key: samples\[1\] and samples\[3\]"):
        write_shard(tmp_path, 0, samples)
    assert os.listdir(tmp_path) == []


def test_failure_during_write_leaves_neither_final_nor_temp_file(tmp_path: Path, monkeypatch):
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_shard(tmp_path, 0, make_outlier_samples(2))
    assert os.listdir(tmp_path) == []


def test_sample_fields_are_checked():
    good = make_outlier_samples(1)[0]
    with pytest.raises(ShardError, match="latent: expected float16 or float32, got float64"):
        OutlierSample(good.key, good.latent.astype(np.float64), good.embedding, 0, {})
    with pytest.raises(ShardError, match=r"latent: expected shape \(C, H, W\)"):
        OutlierSample(good.key, good.latent[0], good.embedding, 0, {})
    with pytest.raises(ShardError, match="embedding: expected float32, got float16"):
        OutlierSample(good.key, good.latent, good.embedding.astype(np.float16), 0, {})
    with pytest.raises(ShardError, match="cls: expected a non-negative int, got -1"):
        OutlierSample(good.key, good.latent, good.embedding, -1, {})
    with pytest.raises(ShardError, match="meta: not JSON-serialisable"):
        OutlierSample(good.key, good.latent, good.embedding, 0, {"when": object()})


def test_sample_key_has_no_dots_and_refuses_bad_job_ids():
    key = sample_key("3f2a-77", cls=4, boundary_index=12, rep=1)
    assert key == "3f2a-77_c0004_b000012_r001"
    with pytest.raises(ShardError, match="job_id"):
        sample_key("job.1", 0, 0, 0)
    with pytest.raises(ShardError, match="boundary_index: expected a non-negative int"):
        sample_key("job1", 0, -3, 0)


# --- manifest ------------------------------------------------------------------------------------


def test_manifest_records_spec_shards_layout_and_generator(tmp_path: Path):
    infos = write_outlier_shards(tmp_path, num_shards=2, per_shard=3, spec={"seed": 7}, latent_shape=(3, 4, 5), dim=9)
    generator = {**TEST_GENERATOR, "kind": "tiny-random"}
    write_manifest(tmp_path, {"seed": 7}, list(reversed(infos)), extra={"job_id": "job0"}, generator=generator)
    manifest = read_manifest(tmp_path)
    assert manifest["schema_version"] == MANIFEST_SCHEMA_VERSION
    assert manifest["spec"] == {"seed": 7}
    assert manifest["job_id"] == "job0"
    assert manifest["num_samples"] == 6
    assert manifest["generator"] == generator
    assert manifest["layout"] == {"latent_shape": [3, 4, 5], "latent_dtype": "float16", "embed_dim": 9}
    assert [entry["name"] for entry in manifest["shards"]] == ["outliers-000000.tar", "outliers-000001.tar"]
    for entry in manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / entry["name"]).read_bytes()).hexdigest()
    assert verify_shards(tmp_path) == infos

    parsed = load_manifest(tmp_path)
    assert parsed.layout == SampleLayout((3, 4, 5), "float16", 9)
    assert (parsed.generator.id, parsed.generator.content_hash) == ("tiny-random", TEST_GENERATOR["content_hash"])
    assert parsed.shard_paths == list_shards(tmp_path)
    assert (parsed.num_samples, parsed.job_id, parsed.document) == (6, "job0", manifest)


def test_manifest_refuses_reserved_extra_keys_and_bad_versions(tmp_path: Path):
    infos = write_outlier_shards(tmp_path, num_shards=1, per_shard=2)
    with pytest.raises(ManifestError, match="extra: key 'shards' is reserved"):
        write_manifest(tmp_path, {}, infos, extra={"shards": []}, generator=TEST_GENERATOR)
    with pytest.raises(ManifestError, match="generator.content_hash: expected 64 lowercase hex digits"):
        write_manifest(tmp_path, {}, infos, generator={"id": "g", "content_hash": ""})
    path = tmp_path / MANIFEST_NAME
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "schema_version": 1}))
    with pytest.raises(ManifestError, match="schema_version is 1, this version reads 2 .*run the job again"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({key: value for key, value in document.items() if key != "layout"}))
    with pytest.raises(ManifestError, match="key 'layout' is missing"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({**document, "layout": {**document["layout"], "latent_dtype": "float64"}}))
    with pytest.raises(ManifestError, match="layout.latent_dtype: expected 'float16' or 'float32', got 'float64'"):
        read_manifest(tmp_path)
    document["shards"][0]["name"] = "../escape.tar"
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=r"shards\[0\]\.name: expected a file name like outliers-000000.tar"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="elsewhere: no such folder"):
        read_manifest(tmp_path / "elsewhere")


def test_shards_without_a_manifest_are_a_job_still_running(tmp_path: Path):
    write_shard(tmp_path, 0, make_outlier_samples(2))
    with pytest.raises(
        ManifestError, match=f"{re.escape(str(tmp_path))}: 1 shards but no manifest.json: .*still running"
    ):
        load_manifest(tmp_path)
    (tmp_path / "outliers-000000.tar").unlink()
    with pytest.raises(ManifestError, match="no manifest.json and no shards"):
        load_manifest(tmp_path)


def test_manifest_of_shards_with_different_layouts_is_refused(tmp_path: Path):
    first = write_shard(tmp_path, 0, make_outlier_samples(2, latent_shape=(4, 8, 8)))
    second = write_shard(tmp_path, 1, make_outlier_samples(2, latent_shape=(4, 4, 4), first=2))
    with pytest.raises(ManifestError, match=r"outliers-000001.tar holds latent \(4, 4, 4\).*outliers-000000.tar holds"):
        write_manifest(tmp_path, {}, [first, second], generator=TEST_GENERATOR)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_a_shard_mixing_layouts_is_refused(tmp_path: Path):
    samples = make_outlier_samples(2) + make_outlier_samples(1, dim=8, first=2)
    with pytest.raises(ShardError, match=r"samples\[2\]: latent .*embedding \(8,\), but samples\[0\] has"):
        write_shard(tmp_path, 0, samples)


def test_verify_shards_catches_a_shard_of_another_size(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=2)
    with (tmp_path / "outliers-000001.tar").open("ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(ManifestError, match="outliers-000001.tar: .* bytes on disk, the manifest says"):
        verify_shards(tmp_path)


def test_verify_shards_catches_a_changed_byte(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=3)
    path = tmp_path / "outliers-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="outliers-000001.tar: sha256 .* the manifest says"):
        verify_shards(tmp_path)


def test_verify_shards_catches_a_missing_shard(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=2)
    (tmp_path / "outliers-000000.tar").unlink()
    with pytest.raises(ManifestError, match="outliers-000000.tar: listed in the manifest but missing"):
        verify_shards(tmp_path)


# --- damaged shards ------------------------------------------------------------------------------


def test_truncated_shard_raises_naming_the_shard(tmp_path: Path):
    info = write_shard(tmp_path, 0, make_outlier_samples(5))
    path = truncate_inside_member(tmp_path / info.name, member_index=9)
    with pytest.raises(ShardError, match=f"shard {re.escape(str(path))}: unreadable tar .*unexpected end of data"):
        list(iter_outlier_samples([path]))
    with pytest.raises(ShardError, match=f"shard {re.escape(str(path))}: truncated"):
        describe_shard(path)


def test_truncated_shard_is_skipped_and_counted(tmp_path: Path):
    broken = make_outlier_samples(5, job_id="broken")
    good = make_outlier_samples(4, job_id="good")
    broken_path = truncate_inside_member(tmp_path / write_shard(tmp_path, 0, broken).name, member_index=9)
    good_path = tmp_path / write_shard(tmp_path, 1, good).name
    stats = ReadStats()
    read = list(iter_outlier_samples([broken_path, good_path], on_error="skip", stats=stats))
    # Member 9 is the second member of sample 2: samples 0 and 1 were whole before the break.
    assert keys_of(read) == keys_of(broken[:2]) + keys_of(good)
    assert (stats.samples, stats.skipped) == (6, 1)
    assert str(broken_path) in stats.errors[0]


def test_missing_member_names_shard_and_key(tmp_path: Path):
    samples = make_outlier_samples(2)
    members = [raw_members(sample) for sample in samples]
    del members[1]["emb.npy"]
    path = write_raw_tar(tmp_path / "outliers-000000.tar", members)
    with pytest.raises(ShardError, match=f"shard {re.escape(str(path))}, key {samples[1].key}: missing member emb.npy"):
        list(iter_outlier_samples([path]))
    stats = ReadStats()
    assert keys_of(iter_outlier_samples([path], on_error="skip", stats=stats)) == [samples[0].key]
    assert stats.skipped == 1


def test_float64_latent_in_a_shard_is_refused(tmp_path: Path):
    sample = make_outlier_samples(1)[0]
    members = raw_members(sample)
    members["latent.npy"] = npy(sample.latent.astype(np.float64))
    path = write_raw_tar(tmp_path / "outliers-000000.tar", [members])
    with pytest.raises(ShardError, match=f"key {sample.key}: latent: expected float16 or float32, got float64"):
        list(iter_outlier_samples([path]))


def test_pickled_npy_member_is_never_unpickled():
    sample = make_outlier_samples(1)[0]
    members = raw_members(sample)
    members["latent.npy"] = npy(np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ShardError, match="latent.npy: not a readable .npy array .*allow_pickle"):
        decode_outlier_sample({**members, "__url__": "x.tar"}, shard="x.tar")


def test_unknown_sample_schema_version_is_refused():
    members = raw_members(make_outlier_samples(1)[0])
    members["json"] = json.dumps({"schema_version": 9}).encode()
    with pytest.raises(ShardError, match="shard s.tar, key .*: json: schema_version is 9"):
        decode_outlier_sample(members, shard="s.tar")


# --- the training pipeline -----------------------------------------------------------------------


def test_resampled_pipeline_yields_exactly_epoch_length(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=4)
    pipeline = outlier_pipeline(list_shards(tmp_path), resampled=True, epoch_length=11, seed=1)
    read = list(pipeline)
    assert len(read) == 11
    assert all(isinstance(sample, OutlierSample) for sample in read)


def test_finite_pipeline_with_epoch_length_repeats_the_shards(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=3)
    read = list(outlier_pipeline(list_shards(tmp_path), epoch_length=9))
    assert len(read) == 9
    assert keys_of(read[6:]) == keys_of(read[:3])


def test_shuffle_with_the_same_seed_repeats_its_order(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=3, per_shard=6)
    urls = list_shards(tmp_path)
    file_order = keys_of(outlier_pipeline(urls))
    first = keys_of(outlier_pipeline(urls, shuffle=10, seed=5))
    again = keys_of(outlier_pipeline(urls, shuffle=10, seed=5))
    other_seed = keys_of(outlier_pipeline(urls, shuffle=10, seed=6))
    assert first == again
    pipeline = outlier_pipeline(urls, shuffle=10, seed=5)
    assert keys_of(pipeline) == first
    assert keys_of(pipeline) != first  # a second pass over the same object is the next epoch
    assert sorted(first) == sorted(file_order) and first != file_order
    assert other_seed != first


def test_split_by_node_gives_each_rank_its_own_shards(tmp_path: Path, monkeypatch):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=3)
    urls = list_shards(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        per_rank.append(keys_of(outlier_pipeline(urls)))
    assert per_rank[0] == keys_of(iter_outlier_samples([urls[0]]))
    assert per_rank[1] == keys_of(iter_outlier_samples([urls[1]]))
    assert len(keys_of(outlier_pipeline(urls, split_by_node=False))) == 6


def test_pipeline_skip_mode_counts_a_truncated_shard(tmp_path: Path):
    write_outlier_shards(tmp_path, num_shards=2, per_shard=4)
    urls = list_shards(tmp_path)
    truncate_inside_member(urls[0], member_index=1)  # breaks sample 0: nothing of shard 0 survives
    stats = ReadStats()
    read = list(outlier_pipeline(urls, on_error="skip", stats=stats))
    assert keys_of(read) == keys_of(iter_outlier_samples([urls[1]]))
    assert stats.skipped == 1 and str(urls[0]) in stats.errors[0]
    with pytest.raises(ShardError, match=f"shard {re.escape(str(urls[0]))}: unreadable tar"):
        list(outlier_pipeline(urls))


def test_pipeline_arguments_are_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="on_error: expected 'raise' or 'skip'"):
        outlier_pipeline([tmp_path / "a.tar"], on_error="ignore")
    with pytest.raises(ConfigError, match="urls: no shards"):
        outlier_pipeline([])
    with pytest.raises(ConfigError, match="epoch_length"):
        outlier_pipeline([tmp_path / "a.tar"], epoch_length=0)


def test_dataloader_workers_read_disjoint_shards_once_each(tmp_path: Path):
    import torch

    write_outlier_shards(tmp_path, num_shards=4, per_shard=3)
    urls = list_shards(tmp_path)
    # batch_size=None: the trainer batches OutlierSample itself; fork keeps worker start-up cheap.
    loader = torch.utils.data.DataLoader(
        outlier_pipeline(urls), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    read = keys_of(loader)
    assert sorted(read) == sorted(keys_of(iter_outlier_samples(urls)))


def test_each_sample_read_is_checked_once(tmp_path: Path, monkeypatch):
    from oal_shared.shards import reader, schema

    write_outlier_shards(tmp_path, num_shards=2, per_shard=3)
    calls = []
    rule = schema.sample_problem

    def counted(*fields, **options):
        calls.append(fields[0])
        return rule(*fields, **options)

    # Both places that could check a sample: the reader, and OutlierSample's constructor.
    monkeypatch.setattr(schema, "sample_problem", counted)
    monkeypatch.setattr(reader, "sample_problem", counted)
    read = keys_of(iter_outlier_samples(list_shards(tmp_path)))
    assert len(read) == 6
    assert sorted(calls) == sorted(read), "one check per sample"
