"""Reading samples: WebDataset stages from shard urls to checked OutlierSample, for tools and training.

Stages: shard list -> [split by node] -> split by worker -> tar reader -> [seeded shuffle] -> decode.
Each sample is checked once, in `decode_outlier_sample`, against the sample rule and (when given)
the layout the manifest records.

The tar reader for local shards is `_local_tar_samples`, not WebDataset's `tarfile_to_samples`:
same grouping of members into samples, but each 512-byte header is decoded field by field (with
tarfile's helpers for the rare encodings) instead of building a TarInfo (whose checksum alone
costs 11 us: it sums the block twice, signed and unsigned), and the
two `.npy` headers of a sample are parsed once per distinct header (all samples of a job share
them). Together they cut the cost of reading a 4.6 KB sample about five times, to about 50 us of
CPU (docs/BENCHMARKS.md). Other urls (pipe:, http) still go through WebDataset.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from oal_shared.errors import ConfigError, ShardError
from oal_shared.shards.policy import ErrorPolicy, ReadStats, check_on_error
from oal_shared.shards.schema import (
    SAMPLE_MEMBERS,
    SHARD_SCHEMA_VERSION,
    OutlierSample,
    SampleLayout,
    checked_sample,
    sample_problem,
)

if TYPE_CHECKING:
    import webdataset


def decode_outlier_sample(raw: dict, shard: str, layout: SampleLayout | None = None) -> OutlierSample:
    """Turn WebDataset's dict of member bytes into an OutlierSample; ShardError names shard and key.

    With `layout` (the manifest's), a sample of another latent shape or dtype or embedding size
    is refused too.
    """
    key = raw.get("__key__")
    if not isinstance(key, str):
        raise ShardError("sample without a __key__", shard=shard)
    missing = [member for member in SAMPLE_MEMBERS if member not in raw]
    if missing:
        raise ShardError(f"missing member {', '.join(missing)} (a sample has {', '.join(SAMPLE_MEMBERS)})", shard, key)
    for member in SAMPLE_MEMBERS:
        if not isinstance(raw[member], bytes | bytearray | memoryview):
            raise ShardError(f"{member}: expected raw bytes, got {type(raw[member]).__name__}", shard, key)
    latent = _read_npy(raw["latent.npy"], "latent.npy", shard, key)
    embedding = _read_npy(raw["emb.npy"], "emb.npy", shard, key)
    try:
        cls = int(bytes(raw["cls"]).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardError(f"cls: expected an ASCII integer, got {bytes(raw['cls'])[:20]!r}", shard, key) from exc
    meta = _read_provenance(raw["json"], shard, key)
    problem = sample_problem(key, latent, embedding, cls, meta, meta_from_json=True)
    if problem is None and layout is not None:
        problem = layout.mismatch(latent, embedding)
    if problem is not None:
        raise ShardError(problem, shard=shard, key=key)
    return checked_sample(key, latent, embedding, cls, meta)


def _read_npy(data: bytes, member: str, shard: str, key: str) -> np.ndarray:
    header = _npy_header(data)
    known = _NPY_HEADERS.get(header) if header is not None else None
    if known is None:
        try:
            array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ShardError(f"{member}: not a readable .npy array ({exc})", shard, key) from exc
        _remember_npy_header(header, data)
        return array
    # A header numpy has parsed before: same dtype and shape, so only the payload's length is left
    # to check (numpy's own check: too few bytes is an error, trailing bytes are ignored).
    dtype, shape, count = known
    have = len(data) - len(header)
    if have < count * dtype.itemsize:
        message = f"EOF: reading array data, expected {count * dtype.itemsize} bytes got {have}"
        raise ShardError(f"{member}: not a readable .npy array ({message})", shard, key)
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape).copy()


# .npy header bytes (magic, version, length, dict) -> (dtype, shape, element count), for headers
# numpy has parsed once; bounded, since a job's samples share two headers.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
_NPY_HEADERS_MAX = 64
_NPY_MAGIC = b"\x93NUMPY"


def _npy_header(data: bytes) -> bytes | None:
    """The header bytes of a version 1.0 or 2.0 .npy file (what numpy parses), or None."""
    if len(data) < 12 or data[:6] != _NPY_MAGIC or data[7] != 0:
        return None
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return None
    return bytes(data[:end]) if end <= len(data) else None


def _remember_npy_header(header: bytes | None, data: bytes) -> None:
    if header is None:
        return
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if fortran_order or dtype.hasobject:  # transposed or pickled arrays keep numpy's full path
        return
    if len(_NPY_HEADERS) >= _NPY_HEADERS_MAX:
        _NPY_HEADERS.clear()
    _NPY_HEADERS[header] = (dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)))


def _read_provenance(data: bytes, shard: str, key: str) -> dict:
    # NaN, Infinity and numbers that overflow to inf are refused here, so the meta read is
    # JSON-serialisable as it stands (what sample_problem would otherwise test by re-encoding it).
    try:
        meta = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardError(f"json: not valid JSON ({exc})", shard, key) from exc
    if not isinstance(meta, dict):
        raise ShardError(f"json: expected an object, got {type(meta).__name__}", shard, key)
    version = meta.pop("schema_version", None)
    if version != SHARD_SCHEMA_VERSION:
        raise ShardError(f"json: schema_version is {version!r}, this version reads {SHARD_SCHEMA_VERSION}", shard, key)
    return meta


_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's: members it never hands out
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_tar_samples(policy: ErrorPolicy) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stage: shard dicts -> raw samples, as `webdataset.tarfile_to_samples` makes them.

    A tar fault (truncated data or header, bad checksum, bad number field, duplicate member)
    goes to the policy's tar handler; a sample is handed on only once complete, so the half
    sample at a break never leaves this stage.
    """

    def stage(shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            url = shard["url"]
            try:
                yield from _samples_of_tar(url)
            except (tarfile.TarError, OSError, ValueError) as exc:
                if not policy.on_tar_error(exc):
                    return

    return stage


def _samples_of_tar(url: str) -> Iterator[dict]:
    """Group a tar's members into samples by key (the name up to the first dot)."""
    sample: dict | None = None
    with open(url, "rb", buffering=1 << 20) as handle:
        for name, data in _tar_members(handle):
            match = _KEY_AND_SUFFIX.match(name)
            if match is None:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if suffix in sample:
                raise ValueError(f"{name}: duplicate file name in tar file {suffix} {sample.keys()}")
            sample[suffix] = data
    if sample is not None:
        yield sample


def _tar_members(handle: io.BufferedReader) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, with tarfile's checks on every header.

    Long names come from pax ("path", "size") or GNU long-name members, as tarfile reads them;
    directories, links and other non-regular members are passed over, as WebDataset does.
    """
    pending: dict[str, str] = {}  # from a pax or long-name member, for the member that follows
    offset = 0
    while True:
        header = handle.read(_BLOCK)
        if not header:
            if offset == 0:
                raise tarfile.ReadError("empty file")
            return  # ends on a block boundary without end-of-archive blocks: tarfile accepts it
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data (truncated header)")
        if header == _ZERO_BLOCK:
            return  # end-of-archive
        checksum = _number(header[148:156])
        # The unsigned sum is what every writer uses; tarfile's pair (with the signed variant) only on a miss.
        if checksum != sum(header) - sum(header[148:156]) + 256 and checksum not in tarfile.calc_chksums(header):
            raise tarfile.ReadError("bad checksum")
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending else _number(header[124:136])
        data = handle.read(size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        handle.seek(-size % _BLOCK, os.SEEK_CUR)
        offset += _BLOCK + size
        if kind == tarfile.XHDTYPE:
            pending.update(_pax_records(data))
            continue
        if kind == tarfile.GNUTYPE_LONGNAME:
            pending["path"] = tarfile.nts(data, "utf-8", "surrogateescape")
            continue
        if kind == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError("GNU sparse members are not supported in shards")
        name = pending.get("path") or _header_name(header, kind)
        pending = {}
        if kind not in tarfile.REGULAR_TYPES or name.endswith("/") or _SKIP_META.match(name):
            continue
        yield name, data


def _number(field: bytes) -> int:
    """A header's number field, as tarfile.nti reads it (octal text, or GNU base-256)."""
    if field[0] & 0x80:
        return tarfile.nti(field)
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None


def _header_name(header: bytes, kind: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[345] == 0 or kind in tarfile.GNU_TYPES:  # no ustar prefix (the usual case)
        return name
    return tarfile.nts(header[345:500], "utf-8", "surrogateescape") + "/" + name


def _pax_records(data: bytes) -> dict[str, str]:
    """The "path" and "size" records of a pax extended header ("<len> <key>=<value>\\n" each)."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        if length <= space - position:
            raise tarfile.ReadError("invalid pax header")
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            records[key.decode("ascii")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to {value}")
    return value


class _SampleDecoder:
    """Map stage: raw WebDataset sample -> OutlierSample, counting successes."""

    def __init__(self, stats: ReadStats, layout: SampleLayout | None):
        self.stats = stats
        self.layout = layout

    def __call__(self, raw: dict) -> OutlierSample:
        sample = decode_outlier_sample(raw, shard=str(raw.get("__url__", "(unknown shard)")), layout=self.layout)
        self.stats.samples += 1
        return sample


class _SeededShuffle:
    """Buffer shuffle whose order is a function of (seed, epoch, rank, worker) only.

    The epoch counter lives in this object and advances each time the pipeline is iterated, so
    every pass differs while a fresh pipeline with the same seed repeats the first pass.
    """

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        from webdataset import shuffle, utils

        self.epoch += 1
        rank, _, worker, _ = utils.pytorch_worker_info()
        rng = random.Random(f"oal-shuffle:{self.seed}:{self.epoch}:{rank}:{worker}")
        return shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)


def _shard_urls(urls: Sequence[str | Path] | str | Path) -> list[str]:
    url_list = [str(urls)] if isinstance(urls, str | Path) else [str(url) for url in urls]
    if not url_list:
        raise ConfigError("urls: no shards to read (empty list)")
    return url_list


def _reading_stages(
    policy: ErrorPolicy, stats: ReadStats, shuffle: int, seed: int, layout: SampleLayout | None
) -> list:
    """shard urls -> raw samples -> (shuffled) -> OutlierSample, with the error policy at each step."""
    import webdataset as wds

    local = all(_is_local(url) for url in policy.urls)
    stages: list = [
        policy.skip_broken_shards,
        _local_tar_samples(policy) if local else wds.tarfile_to_samples(handler=policy.on_tar_error),
        policy.raise_pending,
    ]
    if shuffle:
        stages.append(_SeededShuffle(shuffle, seed))
    stages.append(wds.map(_SampleDecoder(stats, layout), handler=policy.on_sample_error))
    return stages


def iter_outlier_samples(
    urls: Sequence[str | Path],
    on_error: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
    layout: SampleLayout | None = None,
) -> Iterator[OutlierSample]:
    """Every sample of `urls`, shard after shard, in file order (for tools and tests).

    on_error="raise": the first damaged shard or bad sample raises ShardError naming the shard
    (and key). "skip": it is logged, counted in `stats`, and reading goes on; a shard that breaks
    mid-read keeps the samples read before the break. `layout`: refuse samples that differ from it.
    """
    import webdataset as wds

    check_on_error(on_error)
    url_list = _shard_urls(urls)
    stats = stats if stats is not None else ReadStats()
    policy = ErrorPolicy(on_error, stats, url_list)
    yield from wds.DataPipeline(
        wds.SimpleShardList(url_list), *_reading_stages(policy, stats, shuffle=0, seed=0, layout=layout)
    )


def outlier_pipeline(
    urls: Sequence[str | Path],
    *,
    resampled: bool = False,
    epoch_length: int | None = None,
    shuffle: int = 0,
    seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = True,
    layout: SampleLayout | None = None,
) -> webdataset.DataPipeline:
    """A WebDataset pipeline of OutlierSample, ready for torch DataLoader workers and torchrun.

    Stages: shard list -> [split by node] -> split by worker -> tar reader -> [shuffle] -> decode.

    resampled=False: `SimpleShardList`; ranks (if `split_by_node`) and DataLoader workers each take
    a disjoint slice of the shards, so a rank with no shard yields nothing. With `shuffle` the shard
    order is shuffled too, with `seed`, the same way on every rank (the slices stay disjoint).
    resampled=True: `ResampledShards` draws shards with replacement forever; no splitting, since
    each rank and worker draws its own stream (seeded by seed, rank*1000 + worker and the epoch).
    epoch_length: one pass yields exactly this many samples (it repeats a finite shard list and
    cuts the resampled stream, which without it never ends).
    shuffle: buffer size in samples for sample-level shuffling; 0 keeps file order.
    layout: the manifest's sample layout; a sample that differs is a bad sample (see on_error).

    Seeds and repetition: shard draws and the shuffle depend only on (seed, epoch, rank, worker).
    A freshly built pipeline with the same seed and the same workers gives the same order; each
    further pass over the same object advances its epoch and gives a new order. DataLoader workers
    that are not persistent get a fresh copy every epoch, so every epoch repeats the first: pass
    persistent_workers=True, or rebuild with seed=base_seed + epoch.
    """
    import webdataset as wds

    check_on_error(on_error)
    url_list = _shard_urls(urls)
    if epoch_length is not None and (isinstance(epoch_length, bool) or epoch_length < 1):
        raise ConfigError(f"epoch_length: expected a positive number of samples or None, got {epoch_length!r}")
    if isinstance(shuffle, bool) or shuffle < 0:
        raise ConfigError(f"shuffle: expected a buffer size >= 0 (0 = no shuffle), got {shuffle!r}")
    stats = stats if stats is not None else ReadStats()
    policy = ErrorPolicy(on_error, stats, url_list)

    if resampled:
        source: list = [wds.ResampledShards(url_list, seed=seed, deterministic=True)]
    else:
        source = [wds.SimpleShardList(url_list, seed=seed if shuffle else None)]
        if split_by_node:
            source.append(wds.split_by_node)
        source.append(wds.split_by_worker)
    pipeline = wds.DataPipeline(*source, *_reading_stages(policy, stats, shuffle, seed, layout))
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(epoch_length)
    return pipeline
