"""The reader's error policy, as WebDataset handlers and stages: raise at the first fault, or skip
and count (webdataset's handlers.py makes the policy a parameter the same way)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from oal_shared.errors import ConfigError, ShardError

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass
class ReadStats:
    """What a reader saw. Counts live in the process that iterates (each DataLoader worker has its own)."""

    samples: int = 0  # decoded and yielded
    skipped: int = 0  # problems skipped under on_error="skip": one per broken shard or bad sample
    errors: list[str] = field(default_factory=list)  # their messages


class ErrorPolicy:
    """The on_error policy as WebDataset handlers and stages; errors become ShardError naming the shard.

    WebDataset handlers return True to go on and False to stop. A handler never raises here: it
    stores the error and the stage after the tar reader raises it, because WebDataset rewrites the
    args of exceptions on their way through its stages (which would garble our messages).
    Under "skip" a shard that fails is left out for the rest of this pipeline's life (in this
    process); samples it delivered before the failure have already gone downstream.
    """

    def __init__(self, on_error: str, stats: ReadStats, urls: list[str]):
        self.on_error = on_error
        self.stats = stats
        self.urls = frozenset(urls)
        self.broken: set[str] = set()
        self.pending: ShardError | None = None
        # WebDataset opens the next shard only when the last one is used up, so the shard most
        # recently handed to the tar reader is the one any tar error comes from.
        self.current_url = "(no shard opened yet)"

    def skip_broken_shards(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Stage before the tar reader: leave out shards that failed before."""
        for shard in shards:
            if shard["url"] in self.broken:
                if self.broken >= self.urls:
                    raise ShardError(f"all {len(self.urls)} shards are unreadable: {self.stats.errors[-1]}")
                continue
            self.current_url = shard["url"]
            yield shard

    def on_tar_error(self, exc: BaseException) -> bool:
        url = self.current_url
        error = ShardError(f"unreadable tar ({describe_error(exc)})", shard=url)
        if self.on_error == "raise":
            self.pending = self.pending or error
            return False
        if url not in self.broken:  # later errors from a broken stream repeat the first
            self.broken.add(url)
            self._count_skip(error)
        return True

    def raise_pending(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Stage after the tar reader: raise a stored error; drop what a broken shard still yields."""
        self.pending = None
        for sample in samples:
            if self.pending is not None:
                raise self.pending
            if sample.get("__url__") in self.broken:
                continue  # the half-read sample at the break
            yield sample
        if self.pending is not None:
            raise self.pending

    def on_sample_error(self, exc: BaseException) -> bool:
        if self.on_error == "raise" or not isinstance(exc, ShardError):
            raise exc
        self._count_skip(exc)
        return True

    def _count_skip(self, error: ShardError) -> None:
        self.stats.skipped += 1
        self.stats.errors.append(str(error))
        logger.warning("Skipping: %s", error)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    first = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {first.split(' @ ')[0]}"  # drop WebDataset's " @ <file object>"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
