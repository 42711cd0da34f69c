"""Keep paths that come from outside (API requests, image lists, configs) inside the root they belong to.

Both functions resolve symlinks before they compare, so a link inside the root that points out of
it is refused just like a `..` or an absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from oal_shared.errors import UnsafePathError


def safe_join(root: Path, *parts: str) -> Path:
    """Join relative `parts` under `root` and return the resolved path, which stays inside `root`.

    Refused with UnsafePathError: an absolute part, any `..` component (even one that would land
    back inside, so callers never have to reason about it), a NUL byte, and a path whose resolved
    target (after following symlinks) is not below the resolved root. The target need not exist.
    """
    root = Path(root)
    for part in parts:
        text = os.fspath(part)
        if "\x00" in text:
            raise UnsafePathError(f"path part {text!r} under {root} contains a NUL byte")
        pure = PurePath(text)
        if pure.is_absolute() or text.startswith(("/", "\\")):
            raise UnsafePathError(
                f"path part {text!r} is absolute; only paths relative to {root} are allowed"
            )
        if ".." in pure.parts:
            raise UnsafePathError(f"path part {text!r} contains '..'; paths may not climb out of {root}")
    return ensure_within(root, root.joinpath(*parts))


def ensure_within(root: Path, path: Path | str) -> Path:
    """Return `path` resolved (symlinks followed) if it lies in or below the resolved `root`.

    `path` is taken whole: an absolute path, or one relative to the working directory. Anything
    that resolves outside `root` raises UnsafePathError naming both.
    """
    text = os.fspath(path)
    if "\x00" in text:
        raise UnsafePathError(f"path {text!r} contains a NUL byte")
    root_resolved = Path(root).resolve()
    resolved = Path(text).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise UnsafePathError(f"path {text} resolves to {resolved}, which is outside {root_resolved}")
    return resolved
