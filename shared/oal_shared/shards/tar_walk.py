"""The members of a tar held in memory: (name, offset, size) of each regular file, with tarfile's checks.

The shard readers read a shard whole and walk its 512-byte headers here instead of through
`tarfile.TarFile`: each header is decoded field by field (with tarfile's helpers for the rare
encodings) rather than built into a TarInfo, whose checksum alone costs 11 us (it sums the block
twice, signed and unsigned). Members are returned as offsets into the buffer, so a reader that
builds arrays copies each payload once, into the array (docs/BENCHMARKS.md, "Trainer: outliers streamed from shards").

Faults raise what tarfile raises (`tarfile.ReadError` and its kin, or ValueError for a duplicate
member in `group_samples`), with tarfile's words, so the error policy handles them alike.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's: members it never hands out
KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext


def tar_entries(buffer: bytes, *, check_headers: bool = True) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in `buffer`, a whole tar file, in file order.

    Long names come from pax ("path", "size") or GNU long-name members, as tarfile reads them;
    directories, links and other non-regular members are passed over, as WebDataset does.
    check_headers=False leaves out the header checksums, for a buffer already checked whole
    against a digest (a damaged header is then caught by that digest).
    """
    pending: dict[str, str] = {}  # from a pax or long-name member, for the member that follows
    end, position = len(buffer), 0
    if end == 0:
        raise tarfile.ReadError("empty file")
    # Fields are read at their offsets in `buffer` rather than from a copy of each header: the walk
    # runs four times per sample, and the copies were a third of its cost.
    while position < end:  # a tar may end on a block boundary without end-of-archive blocks
        if position + BLOCK > end:
            raise tarfile.ReadError("unexpected end of data (truncated header)")
        if buffer[position] == 0 and buffer[position : position + BLOCK] == _ZERO_BLOCK:
            return  # end-of-archive
        if check_headers:
            _check_header(buffer[position : position + BLOCK])
        kind = buffer[position + 156 : position + 157]
        size = int(pending["size"]) if "size" in pending else _size(buffer, position)
        start = position + BLOCK
        if start + size > end:
            raise tarfile.ReadError("unexpected end of data")
        if kind == tarfile.XHDTYPE:
            pending.update(_pax_records(buffer[start : start + size]))
        elif kind == tarfile.GNUTYPE_LONGNAME:
            pending["path"] = tarfile.nts(buffer[start : start + size], "utf-8", "surrogateescape")
        elif kind == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError("GNU sparse members are not supported in shards")
        else:
            name = pending.get("path") or _header_name(buffer, position, kind)
            pending = {}
            if kind in tarfile.REGULAR_TYPES and not name.endswith("/") and not _SKIP_META.match(name):
                yield name, start, size
        position = start + size + (-size % BLOCK)


def _check_header(header: bytes) -> None:
    checksum = _number(header[148:156])
    # The unsigned sum is what every writer uses; tarfile's pair (with the signed variant) only on a miss.
    if checksum != sum(header) - sum(header[148:156]) + 256 and checksum not in tarfile.calc_chksums(header):
        raise tarfile.ReadError("bad checksum")


def _size(buffer: bytes, position: int) -> int:
    """The size field: 11 octal digits and a NUL as tarfile writes it, else tarfile's other forms."""
    try:
        return int(buffer[position + 124 : position + 135], 8)
    except ValueError:
        return _number(buffer[position + 124 : position + 136])


def group_samples(buffer: bytes, *, check_headers: bool = True) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {suffix: (offset, size)}) per sample: members grouped by the name up to the first dot.

    The grouping of `webdataset.tarfile_to_samples`: consecutive members with one key form a
    sample, suffixes lower-cased; names without a dot are passed over, a repeated suffix within a
    sample is a ValueError with WebDataset's words. A sample is handed on only once complete, so
    the half sample at a break never leaves.
    """
    key: str | None = None
    members: dict[str, tuple[int, int]] = {}
    for name, start, size in tar_entries(buffer, check_headers=check_headers):
        if "/" not in name:  # what the pattern does with a name without folders, at a third of its cost
            member_key, dot, suffix = name.partition(".")
            if not (dot and member_key):
                continue
            suffix = suffix.lower()
        else:
            match = KEY_AND_SUFFIX.match(name)
            if match is None:
                continue
            member_key, suffix = match.group(1), match.group(2).lower()
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        if suffix in members:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix}")
        members[suffix] = (start, size)
    if key is not None:
        yield key, members


def _number(field: bytes) -> int:
    """A header's number field, as tarfile.nti reads it (octal text, or GNU base-256)."""
    if field[0] & 0x80:
        return tarfile.nti(field)
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None


def _header_name(buffer: bytes, position: int, kind: bytes) -> str:
    """The name field of the header at `position`, after its ustar prefix when there is one."""
    nul = buffer.find(0, position, position + 100)
    name = buffer[position : nul if nul >= 0 else position + 100].decode("utf-8", "surrogateescape")
    if buffer[position + 345] == 0 or kind in tarfile.GNU_TYPES:  # no ustar prefix (the usual case)
        return name
    return tarfile.nts(buffer[position + 345 : position + 500], "utf-8", "surrogateescape") + "/" + name


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
