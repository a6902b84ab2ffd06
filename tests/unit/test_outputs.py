"""fastmmio.outputs: atomic files, a run's files published all or none, one run per folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fastmmio import interrupts
from fastmmio.errors import UsageError
from fastmmio.outputs import OutputFolder, check_writable_file, target, write_text


def test_write_text_replaces_atomically_and_leaves_no_temporary(tmp_path: Path):
    p = tmp_path / "a.json"
    p.write_text("old")
    inode = p.stat().st_ino
    write_text(p, "new")
    assert p.read_text() == "new"
    assert p.stat().st_ino != inode  # a new file renamed over the name, not rewritten
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_failed_write_keeps_the_old_file(tmp_path: Path):
    p = tmp_path / "plot.png"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with target(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the plot failed")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["plot.png"]


def test_check_writable_file(tmp_path: Path):
    check_writable_file(tmp_path / "x.json")
    check_writable_file(Path("-"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="is a directory"):
        check_writable_file(tmp_path)
    with pytest.raises(UsageError, match="is not a directory"):
        check_writable_file(tmp_path / "missing" / "x.json")


def test_folder_publishes_on_commit_only(tmp_path: Path):
    out = tmp_path / "out"
    with OutputFolder(out) as folder:
        write_text(out / "a.json", "A")
        with target(out / "b.png") as tmp:
            tmp.write_bytes(b"B")
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
        paths = folder.commit()
    assert sorted(p.name for p in paths) == ["a.json", "b.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.png"]


def test_folder_without_commit_is_left_as_it_was(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(out):
            write_text(out / "a.json", "A")
            raise RuntimeError("the run failed")
    assert not out.exists()  # created by the run, removed again
    out.mkdir()
    (out / "a.json").write_text("earlier")
    with OutputFolder(out):
        write_text(out / "a.json", "A")
    assert [p.name for p in out.iterdir()] == ["a.json"]
    assert (out / "a.json").read_text() == "earlier"


def test_a_signal_during_the_commit_undoes_it(tmp_path: Path, monkeypatch):
    """The signal is recorded inside the commit's critical section; the renames done so far
    are undone (earlier versions restored, new files removed) and Interrupted is raised."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("earlier A")
    interrupts.install()
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # after the first file is in place

    with pytest.raises(interrupts.Interrupted):
        with OutputFolder(out) as folder:
            write_text(out / "a.json", "A")
            write_text(out / "b.json", "B")
            monkeypatch.setattr(os, "replace", replace)
            folder.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    assert (out / "a.json").read_text() == "earlier A"


def test_one_folder_one_run(tmp_path: Path):
    out = tmp_path / "out"
    with OutputFolder(out):
        with pytest.raises(UsageError, match="already open"):
            OutputFolder(out).open()
        write_text(out / "a.json", "A")  # still staged for the first one
        assert not (out / "a.json").exists()
    with OutputFolder(out):  # released on close
        pass
