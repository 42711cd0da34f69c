"""Atomic file writes: readers see no file, the old file, or the whole new one - never half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _naming(target: Path, exc: OSError) -> OSError:
    """An OSError that names the file being written: a full disk reports ENOSPC without a file name."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, f"{exc.strerror or exc} while writing", str(target))


@contextmanager
def atomic_file(target: Path) -> Iterator[BinaryIO]:
    """Write through a hidden temp file in the target's folder, renamed onto the target on success.

    Data and rename are fsynced; on any error the temp file goes and the target is untouched
    (`atomic_path` does all of that; this only opens the temp file for the caller).
    """
    with atomic_path(target) as tmp, open(tmp, "xb") as handle:
        yield handle


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_file(target) as handle:
        handle.write(data)


def fsync_dir(directory: Path) -> None:
    """Makes a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """The one atomic write: for writers that want a filename (safetensors' `save_file`); `atomic_file`
    wraps it for writers that want a handle.

    Yields a hidden temp path in the target's folder; once the block has written it, the file is
    fsynced and renamed onto the target. On any error the temp file goes and the target is untouched.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        named = _naming(target, exc)
        if named is exc:
            raise
        raise named from exc
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename
    fsync_dir(target.parent)
