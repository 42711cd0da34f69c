"""The content hash that pins a generator folder's exact files.

The worker records it in every shard's provenance and in the manifest; the trainer recomputes it
over the generator folder it is given before decoding outliers with that folder's VAE. Both sides
import it from here, because the trainer never imports the synthesis service.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from oal_shared.errors import ConfigError

__all__ = ["GENERATOR_INFO_FILE", "PRETRAIN_REPORT_FILE", "UNHASHED_FILES", "content_hash"]

# Written beside the weights (the generator's description, and the pretraining report); they
# describe a generator rather than make it, so they stay out of the hash.
GENERATOR_INFO_FILE = "oal_generator.json"
PRETRAIN_REPORT_FILE = "pretrain_report.json"
UNHASHED_FILES = frozenset({GENERATOR_INFO_FILE, PRETRAIN_REPORT_FILE})
HASH_READ_BYTES = 1 << 20  # bytes per read while hashing a file


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
