"""One error family for everything the shared code refuses, so callers can catch `OALError`."""


class OALError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(OALError, ValueError):
    """A setting or config field holds a value we cannot use; the message names the field."""


class DataNotFoundError(OALError, FileNotFoundError):
    """A data set is on none of the places we look; the message names every place tried."""


class DataFormatError(OALError, ValueError):
    """A data file exists but its content breaks its format; the message names the file and the fault."""


class EmbeddingSetError(OALError, ValueError):
    """An embedding-set file is malformed: wrong shape, dtype, non-finite values, bad metadata."""


class SpaceMismatchError(OALError, ValueError):
    """Embeddings live in a different conditioning space than the generator expects."""


class ShardError(OALError, ValueError):
    """An outlier shard or one of its samples is unreadable or breaks the schema.

    `shard` and `key` say where, so a person can find and remove the bad file.
    """

    def __init__(self, message: str, shard: str | None = None, key: str | None = None):
        where = ", ".join(part for part in (f"shard {shard}" if shard else "", f"key {key}" if key else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.shard = shard
        self.key = key


class ManifestError(ShardError):
    """manifest.json is missing, malformed, or disagrees with the shards on disk."""


class UnsafePathError(OALError, ValueError):
    """A path escapes the root it must stay under (`..`, absolute path, or a symlink out)."""
