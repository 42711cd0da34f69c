"""Reader (and a small writer, for tests and tools) of the IDX format that (Fashion-)MNIST ships in.

Layout: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32 sizes,
then the values in C order, big-endian. Files may be gzip-compressed; we tell by the gzip magic,
not by the name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from oal_shared.errors import DataFormatError, DataNotFoundError

GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype (from the format's definition on Yann LeCun's MNIST page).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in IDX_DTYPES.items()}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a native-endian array of the shape its header states."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"IDX file {path}: gzip stream is corrupt or truncated ({exc})") from exc
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise DataFormatError(f"IDX file {path}: {len(raw)} bytes is shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(
            f"IDX file {path}: magic number must start with two zero bytes, got {raw[:4].hex()}"
        )
    type_code, ndim = raw[2], raw[3]
    dtype = IDX_DTYPES.get(type_code)
    if dtype is None:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise DataFormatError(f"IDX file {path}: unknown type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise DataFormatError(f"IDX file {path}: header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(f"IDX file {path}: header declares {ndim} dimensions but the file ends first")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DataFormatError(
            f"IDX file {path}: dimensions {shape} of {dtype.name} need {expected} data bytes, found {actual}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: Path | str, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write `array` as IDX; gzip when `compress` is true, or by default when the name ends in `.gz`."""
    path = Path(path)
    array = np.asarray(array)
    type_code = _CODE_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if type_code is None or array.ndim == 0 or array.ndim > 255:
        raise DataFormatError(f"cannot write {array.dtype} array of shape {array.shape} to IDX file {path}")
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[type_code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        # mtime=0 so the same array always gives the same bytes.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
