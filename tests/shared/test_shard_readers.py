"""The shard readers refuse the same things: our local tar walk as WebDataset's reader, and the
trainer's whole-shard block reader as the per-sample reader (it hands every unusual shard to it)."""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from oal_shared.errors import ShardError
from oal_shared.shards import ReadStats, SampleLayout, iter_outlier_samples, sample_key, write_shard
from oal_shared.shards import blocks as shard_blocks
from oal_shared.shards import reader as shard_reader
from oal_shared.shards.blocks import read_shard_block
from tests.utils.bad_shards import BAD_SAMPLES, info_of, members_of, spoil, write_tar
from tests.utils.shards import make_outlier_samples

JSON_FAULTS = ("bad json", "json list", "schema version", "NaN in meta", "overflowing float in meta")


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


# --- the block reader: whole shards, and the per-sample reader for anything unusual ----------------


def per_sample_reader_is_not_called(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an intact, usual shard must not need the per-sample reader")

    monkeypatch.setattr(shard_blocks, "iter_outlier_samples", refuse)


def assert_block_is(block, samples) -> None:
    assert block.keys == tuple(s.key for s in samples)
    assert block.latents.dtype == samples[0].latent.dtype and block.embeddings.dtype == np.float32
    assert np.array_equal(block.latents, np.stack([s.latent for s in samples]))
    assert np.array_equal(block.embeddings, np.stack([s.embedding for s in samples]))
    assert block.classes.tolist() == [s.cls for s in samples]


@pytest.mark.parametrize("latent_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("job_id", ["job0", "j" * 150])  # short names, and pax long names
def test_a_block_holds_what_the_writer_wrote_without_the_per_sample_reader(tmp_path, monkeypatch, latent_dtype, job_id):
    samples = make_outlier_samples(7, latent_dtype=latent_dtype, job_id=job_id)
    info = write_shard(tmp_path, 0, samples)
    layout = SampleLayout.of(samples[0].latent, samples[0].embedding)
    per_sample_reader_is_not_called(monkeypatch)
    stats = ReadStats()
    block = read_shard_block(tmp_path / info.name, info, layout, stats=stats)
    assert_block_is(block, samples)
    assert stats.samples == 7 and stats.skipped == 0


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_keys_make_the_same_block_in_every_tar_format(tmp_path, monkeypatch, tar_format):
    samples = make_outlier_samples(3)
    keys = [sample_key("j" * 160, s.cls, i, 0) for i, s in enumerate(samples)]
    rows = [(key, members_of(sample)) for key, sample in zip(keys, samples, strict=True)]
    path = write_tar(tmp_path / "outliers-000000.tar", rows, tar_format)
    per_sample_reader_is_not_called(monkeypatch)
    block = read_shard_block(path, info_of(path), SampleLayout.of(samples[0].latent, samples[0].embedding))
    assert_block_is(block, [replace(s, key=k) for k, s in zip(keys, samples, strict=True)])


@pytest.mark.parametrize("kind", [kind for kind in BAD_SAMPLES if kind not in JSON_FAULTS])
def test_a_bad_sample_in_an_intact_shard_gets_the_per_sample_readers_refusal(tmp_path, kind):
    samples = make_outlier_samples(3)
    rows = [(s.key, members_of(s) if i != 1 else spoil(kind, members_of(s), s)) for i, s in enumerate(samples)]
    path = write_tar(tmp_path / "outliers-000000.tar", rows)
    layout = SampleLayout.of(samples[0].latent, samples[0].embedding)
    with pytest.raises(ShardError) as per_sample:
        list(iter_outlier_samples([path], layout=layout))
    with pytest.raises(ShardError) as block:
        read_shard_block(path, info_of(path), layout)  # the manifest entry matches: the fast path sees it first
    assert str(block.value) == str(per_sample.value) and f"key {samples[1].key}" in str(block.value)
    stats = ReadStats()
    kept = read_shard_block(path, info_of(path), layout, on_error="skip", stats=stats)
    assert kept.keys == (samples[0].key, samples[2].key) and stats.skipped == 1


@pytest.mark.parametrize("kind", JSON_FAULTS)
def test_the_block_reader_leaves_provenance_unread_in_an_intact_shard(tmp_path, kind):
    # Documented (blocks.py): an intact shard's JSON was checked by the writer, and training never reads it.
    samples = make_outlier_samples(3)
    rows = [(s.key, members_of(s) if i != 1 else spoil(kind, members_of(s), s)) for i, s in enumerate(samples)]
    path = write_tar(tmp_path / "outliers-000000.tar", rows)
    block = read_shard_block(path, info_of(path), SampleLayout.of(samples[0].latent, samples[0].embedding))
    assert block.keys == tuple(s.key for s in samples)


def test_a_shard_that_changed_after_the_job_is_refused_or_read_with_a_note(tmp_path):
    samples = make_outlier_samples(4)
    info = write_shard(tmp_path, 0, samples)
    layout = SampleLayout.of(samples[0].latent, samples[0].embedding)
    path = tmp_path / info.name
    other = replace(info, sha256="0" * 64)  # what the manifest would say of another file
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))}: .* the manifest records .* changed after the job"):
        read_shard_block(path, other, layout)
    stats = ReadStats()
    block = read_shard_block(path, other, layout, on_error="skip", stats=stats)
    assert_block_is(block, samples)
    assert stats.skipped == 0 and len(stats.errors) == 1 and "changed after the job" in stats.errors[0]


def test_a_truncated_shard_keeps_what_precedes_the_cut_under_skip(tmp_path):
    samples = make_outlier_samples(4)
    info = write_shard(tmp_path, 0, samples)
    layout = SampleLayout.of(samples[0].latent, samples[0].embedding)
    path = tmp_path / info.name
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[9].offset_data + 5  # inside the second member of sample 2
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardError, match="unexpected end of data"):
        read_shard_block(path, info, layout)
    stats = ReadStats()
    block = read_shard_block(path, info, layout, on_error="skip", stats=stats)
    assert_block_is(block, samples[:2])
    assert stats.skipped == 1 and any("changed after the job" in error for error in stats.errors)


def test_a_missing_shard_is_named(tmp_path):
    samples = make_outlier_samples(2)
    info = write_shard(tmp_path, 0, samples)
    (tmp_path / info.name).unlink()
    with pytest.raises(ShardError, match=re.escape(str(tmp_path / info.name))):
        read_shard_block(tmp_path / info.name, info, SampleLayout.of(samples[0].latent, samples[0].embedding))
