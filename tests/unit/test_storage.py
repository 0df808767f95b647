import os
from pathlib import Path

import pytest

from llmshrink import storage


def test_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSHRINK_HOME", str(tmp_path / "h"))
    assert storage.home() == tmp_path / "h"
    monkeypatch.delenv("LLMSHRINK_HOME")
    assert storage.home() == Path.home() / ".cache" / "llmshrink"


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    storage.atomic_write_text(p, "one")
    storage.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["f.txt"]
    assert (p.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_atomic_directory_commits_on_success(tmp_path):
    dest = tmp_path / "d"
    with storage.atomic_directory(dest) as tmp:
        (tmp / "a").write_text("x")
        assert not dest.exists()
    assert (dest / "a").read_text() == "x"


def test_atomic_directory_failure_keeps_old_content(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "old").write_text("keep")
    with pytest.raises(RuntimeError), storage.atomic_directory(dest) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert os.listdir(dest) == ["old"]


def test_sha256_and_tree_size(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").write_bytes(b"12345")
    assert storage.sha256_file(tmp_path / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert storage.tree_size(tmp_path) == 8
    assert storage.tree_size(tmp_path / "missing") == 0
