"""Where generators run and in which precision: one place that turns setting strings into torch objects.

Half precision only pays on a GPU; on a CPU float16 matmuls are slow or unsupported, so "auto"
means float16 on CUDA and float32 everywhere else.
"""

from __future__ import annotations

import logging

import torch

from oal_shared.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device; "auto" picks CUDA when it is available."""
    name = requested or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Turn a DiffusionConfig.dtype name into a torch dtype for `device` ("auto": float16 on CUDA only)."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ConfigError(f"diffusion.dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
    dtype = DTYPES[requested]
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 on the CPU is slow and loses precision; float32 is the better choice there")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The DiffusionConfig name of a torch dtype ("float16", ...), for cache keys and provenance."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
