"""A generator folder on disk: its `oal_generator.json`, and the hash that pins its exact files
(computed in `oal_shared.generator_hash`, where the trainer reads it too).

No torch here: the API lists generators by reading these JSON files only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path

from oal_shared.errors import ConfigError
from oal_shared.fsio import atomic_write_bytes
from oal_shared.generator_hash import PRETRAIN_REPORT_FILE, UNHASHED_FILES, content_hash
from oal_synth.generators.base import GENERATOR_INFO_FILE, GeneratorInfo

__all__ = [
    "PRETRAIN_REPORT_FILE",
    "UNHASHED_FILES",
    "content_hash",
    "model_index_has_text_encoder",
    "read_generator_info",
    "replace_dir",
    "short_hash",
    "write_generator_info",
]

def short_hash(data: bytes, length: int = 12) -> str:
    """The first `length` hex digits of sha256(data): ids like "sd-token:3f9a0c1b2d4e"."""
    return hashlib.sha256(data).hexdigest()[:length]


def read_generator_info(folder: Path) -> GeneratorInfo:
    """Parse `folder/oal_generator.json`; a missing or malformed file raises ConfigError naming it."""
    path = Path(folder) / GENERATOR_INFO_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: generator info file is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable generator info ({exc})") from exc
    return GeneratorInfo.from_json(data, source=str(path))


def write_generator_info(folder: Path, info: GeneratorInfo) -> Path:
    """Write `folder/oal_generator.json` atomically (temp file, fsync, rename)."""
    path = Path(folder) / GENERATOR_INFO_FILE
    text = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def model_index_has_text_encoder(folder: Path) -> bool:
    """True when the diffusers `model_index.json` names a text encoder: a Stable Diffusion folder."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not a diffusers pipeline folder (model_index.json is missing)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable model index ({exc})") from exc
    entry = index.get("text_encoder")
    # diffusers writes [library, class] for a component and [null, null] for one saved as None.
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target` (same file system); an old `target` is moved
    aside first and removed after, so readers see the old folder or the new one, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{secrets.token_hex(4)}")
        target.rename(old)
    source.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
