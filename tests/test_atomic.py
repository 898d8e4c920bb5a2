"""qlora/atomic.py: the target is the old content or the whole new one, never a mix or a
leftover."""

import os
import stat

import pytest

from qlora.atomic import atomic_dir, atomic_path, atomic_write_text


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_text_creates_then_replaces_leaving_no_temp(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and listing(target.parent) == ["summary.json"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "plots.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["plots.png"]


def test_dir_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "step-000002"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("2")
        assert not target.exists()  # nothing at the target until the block succeeds
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert listing(target) == ["c"] and listing(tmp_path) == ["step-000002"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


def test_a_failed_dir_keeps_the_old_directory(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("ha")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "old" and listing(tmp_path) == ["adapter"]
