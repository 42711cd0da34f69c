"""safe_join / ensure_within: every way out of the root is refused, with real symlinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from oal_shared.errors import UnsafePathError
from oal_shared.paths import ensure_within, safe_join


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


def test_safe_join_returns_the_resolved_path_inside_root(root: Path):
    joined = safe_join(root, "sub", "not-yet-written.png")
    assert joined == root.resolve() / "sub" / "not-yet-written.png"
    assert safe_join(root, "sub/a/b.txt") == root.resolve() / "sub" / "a" / "b.txt"


def test_safe_join_refuses_an_absolute_part(root: Path):
    with pytest.raises(UnsafePathError, match=r"'/etc/passwd' is absolute"):
        safe_join(root, "sub", "/etc/passwd")


@pytest.mark.parametrize("part", ["../outside/x", "sub/../../outside", "sub/../sub/x", ".."])
def test_safe_join_refuses_parent_references(root: Path, part: str):
    with pytest.raises(UnsafePathError, match=r"contains '\.\.'") as error:
        safe_join(root, part)
    assert part in str(error.value)


def test_safe_join_refuses_a_symlink_that_leaves_root(root: Path, tmp_path: Path):
    (root / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="escape/secret.txt") as error:
        safe_join(root, "escape", "secret.txt")
    assert str(tmp_path / "outside" / "secret.txt") in str(error.value)


def test_safe_join_refuses_a_file_symlink_that_leaves_root(root: Path, tmp_path: Path):
    target = tmp_path / "outside" / "model.bin"
    target.write_bytes(b"x")
    (root / "sub" / "model.bin").symlink_to(target)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(root, "sub/model.bin")


def test_safe_join_follows_a_symlink_that_stays_inside(root: Path):
    (root / "alias").symlink_to(root / "sub")
    assert safe_join(root, "alias", "x.png") == root.resolve() / "sub" / "x.png"


def test_safe_join_works_when_root_itself_is_a_symlink(root: Path, tmp_path: Path):
    link_root = tmp_path / "link-root"
    link_root.symlink_to(root)
    assert safe_join(link_root, "sub") == root.resolve() / "sub"


def test_safe_join_refuses_a_nul_byte(root: Path):
    with pytest.raises(UnsafePathError, match="NUL"):
        safe_join(root, "sub\x00.png")


def test_ensure_within_accepts_inside_and_refuses_outside(root: Path, tmp_path: Path):
    assert ensure_within(root, root / "sub" / "x") == root.resolve() / "sub" / "x"
    outside = tmp_path / "outside" / "x"
    with pytest.raises(UnsafePathError, match=str(outside)):
        ensure_within(root, outside)
    with pytest.raises(UnsafePathError, match="outside"):
        ensure_within(root, root / ".." / "outside")


def test_ensure_within_refuses_a_path_through_an_escaping_symlink(root: Path, tmp_path: Path):
    (root / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="outside"):
        ensure_within(root, root / "escape" / "x")
