"""The benchmark registry: one in-distribution data set (train and test) plus the OOD sets it is
scored against, by name.

`fmnist-osr` (docs/METHOD.md, The embedded benchmark) runs offline from Debian's Fashion-MNIST
(`fmnist_osr.py`); `cifar10` and `cifar100` read OpenOOD v1.5 image lists from the data directory
(`cifar.py`). Wherever a benchmark id is accepted, a benchmark file (`.toml`/`.json`,
`folder_spec.py`) describing your own image folders or lists is accepted too (`folder.py`). The
types live in `types.py` and are re-exported here, where callers import them.
"""

from __future__ import annotations

from pathlib import Path

from oal_shared.data.cifar import load_cifar_benchmark
from oal_shared.data.fmnist_osr import FMNIST_OSR, FMNIST_OSR_ID_CLASSES, FMNIST_OSR_NEAR_CLASSES, load_fmnist_osr
from oal_shared.data.folder_spec import is_benchmark_file, resolve_benchmark_file
from oal_shared.data.types import OOD_LABEL, SET_KINDS, Benchmark, ImageSet, channel_stats, is_ood
from oal_shared.errors import ConfigError
from oal_shared.settings import Settings, get_settings

__all__ = [
    "BENCHMARKS",
    "FMNIST_OSR",
    "FMNIST_OSR_ID_CLASSES",
    "FMNIST_OSR_NEAR_CLASSES",
    "OOD_LABEL",
    "SET_KINDS",
    "Benchmark",
    "ImageSet",
    "channel_stats",
    "is_benchmark_file",
    "is_ood",
    "load_benchmark",
]

BENCHMARKS = (FMNIST_OSR, "cifar10", "cifar100")


def load_benchmark(name: str, settings: Settings | None = None, *, confined: bool = False) -> Benchmark:
    """The benchmark called `name`, built once per process and data location.

    `name` is one of BENCHMARKS or a benchmark file (.toml/.json). `confined=True` (a job's
    `embeddings.benchmark`) takes the file only as a path inside the data root; otherwise it is
    looked up as given, then below the data root. The paths inside a file always stay in the root.
    """
    settings = settings if settings is not None else get_settings()
    if is_benchmark_file(name):
        from oal_shared.data.folder import load_folder_benchmark  # imports torchvision's folder helpers

        path = resolve_benchmark_file(name, Path(settings.data_dir), confined=confined)
        return load_folder_benchmark(path, Path(settings.data_dir))
    if name == FMNIST_OSR:
        return load_fmnist_osr(settings)
    if name in ("cifar10", "cifar100"):
        return load_cifar_benchmark(name, Path(settings.data_dir))
    raise ConfigError(f"benchmark must be one of {BENCHMARKS} or a benchmark file (.toml or .json), got {name!r}")
