"""A generator folder on disk: its `oal_generator.json` and the hash that pins its exact files.

No torch here: the API lists generators by reading these JSON files only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from oal_shared.errors import ConfigError
from oal_synth.generators.base import GENERATOR_INFO_FILE, GeneratorInfo

# Written beside the weights by `pretrain`, read by docs; not part of what the loader reads.
PRETRAIN_REPORT_FILE = "pretrain_report.json"
# Files that describe a generator rather than make it; they stay out of the content hash.
UNHASHED_FILES = frozenset({GENERATOR_INFO_FILE, PRETRAIN_REPORT_FILE})
HASH_READ_BYTES = 1 << 20


def content_hash(folder: Path) -> str:
    """sha256 over every file the loader reads (weights, configs, tokenizer), by relative path.

    Hidden files and UNHASHED_FILES are skipped, so the hash changes exactly when what a
    generator computes can change.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.name not in UNHASHED_FILES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise ConfigError(f"{folder}: no model files to hash; is this a generator folder?")
    for path in files:
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_READ_BYTES):
                file_digest.update(chunk)
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        digest.update(file_digest.digest())
    return digest.hexdigest()


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
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            json.dump(info.to_json(), handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
