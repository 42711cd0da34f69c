"""Which generators exist, where their folders are, and loading them once per process.

`list_generators`, `resolve_generator_path` and `find_generator` read JSON files only: the API imports this module
and must stay free of torch and diffusers (a test checks `sys.modules` in a fresh interpreter).
`load_generator` imports the model code lazily.

Generators live under `settings.generator_root`, one folder each with an `oal_generator.json`.
Two ids are built in: "tiny-random" (built into `<root>/tiny-random` on first use) and
"fmnist-ldm" (listed once `oal-synth pretrain` has written `<root>/fmnist-ldm`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from oal_shared.errors import ConfigError, UnsafePathError
from oal_shared.paths import safe_join
from oal_shared.settings import Settings
from oal_synth.generators.base import GENERATOR_INFO_FILE, GeneratorInfo
from oal_synth.generators.files import model_index_has_text_encoder, read_generator_info
from oal_synth.generators.tiny_random import TINY_RANDOM_ID, unbuilt_info

if TYPE_CHECKING:
    from oal_synth.generators.base import LatentGenerator

logger = logging.getLogger(__name__)

FMNIST_LDM_ID = "fmnist-ldm"
BUILTIN_IDS = (TINY_RANDOM_ID, FMNIST_LDM_ID)
MAX_SCAN_DEPTH = 3  # <root>/<a>/<b>/<c>/oal_generator.json at most: "org/model" style names fit


class GeneratorNotFoundError(ConfigError):
    """The job's `generator` names no known id and no generator folder; the message lists the ids."""


class GeneratorLoadError(ConfigError):
    """A generator folder exists but its model cannot be loaded: a component is missing or corrupt.

    A ConfigError, so the worker fails the job at once: retrying cannot repair files on disk.
    """


def _scan(root: Path) -> dict[str, tuple[Path, GeneratorInfo]]:
    """Every readable generator folder under root, by id; first folder wins on a repeated id."""
    found: dict[str, tuple[Path, GeneratorInfo]] = {}
    if not root.is_dir():
        return found
    root = root.resolve()
    for current, dirs, files in os.walk(root, followlinks=False):
        folder = Path(current)
        depth = len(folder.relative_to(root).parts)
        # Hidden folders are half-written builds and moved-aside old versions.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_SCAN_DEPTH else []
        if GENERATOR_INFO_FILE not in files or folder == root:
            continue
        try:
            info = read_generator_info(folder)
        except ConfigError as exc:
            logger.warning("skipping generator folder %s: %s", folder, exc)
            continue
        if info.id in found:
            logger.warning("generator id %r appears in %s and %s; using the first", info.id, found[info.id][0], folder)
            continue
        found[info.id] = (folder, info)
        dirs[:] = []  # a generator folder's subfolders are its components
    return found


def list_generators(settings: Settings) -> list[GeneratorInfo]:
    """Every generator a job may name, sorted by id; tiny-random is listed even before it is built."""
    found = _scan(Path(settings.generator_root))
    infos = {generator_id: info for generator_id, (_, info) in found.items()}
    infos.setdefault(TINY_RANDOM_ID, unbuilt_info())
    return [infos[generator_id] for generator_id in sorted(infos)]


def resolve_generator_path(spec_id: str, settings: Settings) -> Path:
    """The folder of a generator id, or of a folder name relative to the generator root.

    Ids come first (from the `oal_generator.json` files, plus "tiny-random" at `<root>/tiny-random`
    even before it exists). A folder name must stay inside the root (`safe_join` refuses `..`,
    absolute paths and symlinks out) and hold a diffusers `model_index.json`.
    """
    root = Path(settings.generator_root)
    found = _scan(root)
    if spec_id in found:
        return found[spec_id][0]
    if spec_id == TINY_RANDOM_ID:
        return safe_join(root, TINY_RANDOM_ID)
    try:
        folder = safe_join(root, spec_id)
    except UnsafePathError as exc:
        raise GeneratorNotFoundError(f"generator {spec_id!r}: {exc}") from exc
    if (folder / "model_index.json").is_file():
        return folder
    known = sorted({*found, TINY_RANDOM_ID})
    raise GeneratorNotFoundError(
        f"generator {spec_id!r} is neither a known id ({', '.join(known)}) nor a diffusers folder under {root}"
        + (f"; run `oal-synth pretrain` to create {FMNIST_LDM_ID!r}" if spec_id == FMNIST_LDM_ID else "")
    )


def find_generator(generator_id: str, settings: Settings) -> GeneratorInfo | None:
    """The info of generator `generator_id` (an id, or a folder under the generator root), from JSON only.

    None when the folder exists but describes itself only once loaded (a bare diffusers folder
    without oal_generator.json); GeneratorNotFoundError, listing the known ids, when there is no
    such generator.
    """
    for info in list_generators(settings):
        if info.id == generator_id:
            return info
    folder = resolve_generator_path(generator_id, settings)
    try:
        return read_generator_info(folder)
    except ConfigError:
        return None


_cache: dict[tuple[str, str, str, int], LatentGenerator] = {}
_cache_lock = threading.Lock()


def load_generator(
    generator_id: str, settings: Settings, device: str | None = None, dtype: str = "auto"
) -> LatentGenerator:
    """The generator for an id or folder, loaded once per process and (device, dtype).

    device: None takes `settings.device`. A folder whose model_index.json names a text encoder is
    Stable Diffusion, anything else the embedded kind. A folder rewritten on disk (new
    `oal_generator.json`) is loaded afresh.
    """
    from oal_synth.devices import dtype_name, resolve_device, resolve_dtype

    folder = resolve_generator_path(generator_id, settings)
    torch_device = resolve_device(device or settings.device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with _cache_lock:
        if generator_id == TINY_RANDOM_ID and not (folder / GENERATOR_INFO_FILE).is_file():
            from oal_synth.generators.tiny_random import build_tiny_random_pipeline

            build_tiny_random_pipeline(folder)
        info_file = folder / GENERATOR_INFO_FILE
        stamp = info_file.stat().st_mtime_ns if info_file.is_file() else 0
        key = (str(folder), str(torch_device), dtype_name(torch_dtype), stamp)
        if key not in _cache:
            for old in [k for k in _cache if k[:3] == key[:3]]:
                del _cache[old]  # the folder changed on disk: drop the stale model
            _cache[key] = _load(folder, torch_device, torch_dtype)
        return _cache[key]


def _load(folder: Path, device, dtype) -> LatentGenerator:
    is_stable_diffusion = model_index_has_text_encoder(folder)  # ConfigError when model_index.json is missing
    check_components(folder)
    try:
        if is_stable_diffusion:
            from oal_synth.generators.stable_diffusion import StableDiffusionGenerator

            return StableDiffusionGenerator.from_pretrained(folder, device=device, dtype=dtype)
        from oal_synth.generators.embedded import EmbeddedGenerator

        return EmbeddedGenerator.from_pretrained(folder, device=device, dtype=dtype)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # diffusers/transformers report unreadable weights as OSError
        raise GeneratorLoadError(f"generator folder {folder} cannot be loaded: {exc}") from exc


def check_components(folder: Path) -> None:
    """Every component `model_index.json` names must have its subfolder; the error names the missing ones.

    diffusers itself only says "no file named config.json found in <folder>", which hides which part is gone.
    """
    index_path = Path(folder) / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeneratorLoadError(f"{index_path}: unreadable model index ({exc})") from exc
    # diffusers writes [library, class] per component, [null, null] for one saved as None.
    named = [
        name
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
    ]
    missing = [name for name in named if not (Path(folder) / name).is_dir()]
    if missing:
        raise GeneratorLoadError(
            f"generator folder {folder} lacks the component folder(s) {', '.join(f'{m}/' for m in missing)} "
            f"that {index_path.name} names"
        )


def clear_generator_cache() -> None:
    """Forget every loaded generator (tests; a worker that must free memory)."""
    with _cache_lock:
        _cache.clear()
