"""One rule for deriving seeds, so every stream of randomness is named and independent of the others.

`derive_seed("oal-outlier", job_seed, index)` hashes the parts joined by ":" with SHA-256 and
keeps 63 bits: stable across Python versions, processes and machines (unlike `hash()`), and a
change to one stream (more classes, another batch size) never shifts another stream.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the light API process, which imports oal_shared too
    import torch

#: Seeds are non-negative and fit an int64 (numpy, torch and JSON all hold them).
SEED_BITS = 63


def derive_seed(namespace: str, *parts: object) -> int:
    """A 63-bit seed for the stream `namespace` and `parts`, e.g. derive_seed("oal-sampler", seed, class_id)."""
    digest = hashlib.sha256(":".join(str(p) for p in (namespace, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def seeded_generator(namespace: str, *parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded with `derive_seed(namespace, *parts)`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(namespace, *parts))
