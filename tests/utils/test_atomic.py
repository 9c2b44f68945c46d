"""Tests of atomic writes: a reader sees the old file or the new one, never a partial one."""

import os
from pathlib import Path

import pytest

from ml.utils.atomic import atomic_symlink, atomic_write_text, atomic_write_with


def test_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, error: BaseException
) -> None:
    path = tmp_path / "f.bin"
    atomic_write_text(path, "old")

    def write(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise error

    with pytest.raises(type(error)):
        atomic_write_with(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_symlink_swap_is_relative_and_replaces_the_old_link(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    link = tmp_path / "latest"
    atomic_symlink("a", link)
    atomic_symlink("b", link)
    assert os.readlink(link) == "b" and link.read_text() == "b"
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert (moved / "latest").read_text() == "b"  # relative links survive moving the folder
    assert sorted(p.name for p in moved.iterdir()) == ["a", "b", "latest"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
