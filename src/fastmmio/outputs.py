"""Output files that never lie: atomic writes, a run's files published together, one run per
output folder at a time.

* Every file is written to a temporary file in the same folder and renamed over its name
  (``os.replace``, atomic within a file system), so a reader, a killed run or a full disk
  never leaves a half-written file under the final name.
* :class:`OutputFolder` is a command's output folder for one run. Opened before the work
  starts, it checks that the folder can be created and written (a probe file), creates it if
  needed and takes an exclusive lock on it (``flock`` on the directory itself, so no lock file
  is left behind): a second run into the same folder is refused at once with a clear message
  instead of interleaving its files with the first's. While it is open, the writers of this
  module (:func:`write_text`, :func:`open_text`, :func:`target`) *stage* files for that folder
  instead of publishing them; :meth:`OutputFolder.commit` publishes them all at the end, inside
  :func:`fastmmio.interrupts.critical`: a Ctrl-C or SIGTERM that arrives while the files are
  renamed undoes the renames (earlier versions are kept as hard links until then). A run that
  fails or is interrupted before the commit removes its temporary files, and the folder itself
  if it created it: the folder is left as it was.
* Outside an open :class:`OutputFolder` each file is published as soon as it is written.
* ``-`` as a file name means standard output (:func:`is_stdout`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from fastmmio import interrupts
from fastmmio.errors import UsageError

_TMP_PREFIX = ".fastmmio-tmp-"
_open_folders: dict[Path, "OutputFolder"] = {}
_published: list[Path] = []  # files this process has published (for the interrupt line)


def published() -> list[Path]:
    """The files this process has published so far (each complete)."""
    return list(_published)


def forget_published() -> None:
    _published.clear()


def is_stdout(name: str | Path | None) -> bool:
    return name is not None and str(name) == "-"


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would have given a new file


def _tempfile(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{name}.", dir=directory)
    try:
        os.fchmod(fd, _MODE)  # mkstemp makes it 0600
    finally:
        os.close(fd)
    return Path(tmp)


def check_writable_file(path: Path) -> None:
    """UsageError now, before any work, if ``path`` cannot be written atomically: a folder,
    a missing parent, a parent where no file can be created (permission, read-only file
    system). ``-`` (standard output) always passes."""
    if is_stdout(path):
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: {parent} is not a directory")
    try:
        os.unlink(_tempfile(parent, path.name))
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {parent}: {_why(exc)}") from None


class OutputFolder:
    """One run's output folder (see the module docstring). Use as a context manager."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._key = self.path.absolute()
        self._created = False
        self._fd: int | None = None
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.committed: list[Path] = []

    # -- open: checks, creation, lock ----------------------------------------------------

    def open(self) -> "OutputFolder":
        """Check, create (if needed) and lock the folder; all or nothing, and a signal that
        comes meanwhile is raised only once nothing of it is left behind."""
        try:
            with interrupts.critical():
                self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _where(self) -> str:
        p = self.path
        return str(p) if p.is_absolute() else f"{p} (in {p.absolute().parent})"

    def _open(self) -> None:
        p = self.path
        if self._key in _open_folders:
            raise UsageError(f"output folder {p} is already open in this process")
        if p.exists() and not p.is_dir():
            raise UsageError(f"output folder {self._where()} exists and is not a directory")
        if not p.exists():
            parent = p.absolute().parent
            if not parent.is_dir():
                raise UsageError(f"cannot create output folder {p}: {parent} does not exist")
            try:
                p.mkdir()
                self._created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise UsageError(f"cannot create output folder {self._where()}: "
                                 f"{_why(exc)}") from None
        try:
            self._fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise UsageError(
                        f"another fastmmio run is writing into {p}; wait for it to finish or "
                        "choose another --out") from None
                raise
            os.unlink(_tempfile(p, "probe"))  # can files be created in it?
        except OSError as exc:
            raise UsageError(f"cannot write into output folder {self._where()}: "
                             f"{_why(exc)}") from None
        _open_folders[self._key] = self

    def __enter__(self) -> "OutputFolder":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- staging ---------------------------------------------------------------------------

    def stage(self, final: Path) -> Path:
        """A new temporary file in the folder that :meth:`commit` will rename to ``final``."""
        with interrupts.critical():  # never a temporary file that close() would not know
            tmp = _tempfile(self.path, final.name)
            self._staged.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        """Publish every staged file under its final name, all or none (see the module
        docstring); returns the final paths. Ignores signals afterwards: the run is done."""
        backups: list[tuple[Path, Path | None]] = []  # (final, hard link to its old version)
        with interrupts.critical():
            try:
                for tmp, final in self._staged:
                    old = None
                    if final.exists():
                        old = _tempfile(self.path, final.name + ".old")
                        os.unlink(old)
                        os.link(final, old)
                    backups.append((final, old))
                    os.replace(tmp, final)
                    if interrupts.pending() is not None:
                        raise interrupts.Interrupted(interrupts.pending())
            except BaseException as exc:
                for final, old in reversed(backups):
                    try:
                        if old is not None:
                            os.replace(old, final)
                        else:
                            os.unlink(final)
                    except OSError:
                        pass
                if isinstance(exc, OSError):
                    raise UsageError(f"cannot write into {self.path}: {_why(exc)}") from None
                raise
            for _final, old in backups:
                if old is not None:
                    try:
                        os.unlink(old)
                    except OSError:
                        pass
            interrupts.finished()
        self.committed = [f for _t, f in self._staged]
        _published.extend(self.committed)
        self._staged = []
        return self.committed

    # -- close -------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove what was staged and not published, and the folder if this run created it
        and left nothing in it; release the lock. Idempotent."""
        with interrupts.critical():
            self._close()

    def _close(self) -> None:
        for tmp, _final in self._staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._staged = []
        if self._created and not self.committed:
            try:
                self.path.rmdir()
            except OSError:
                pass
        if _open_folders.get(self._key) is self:
            del _open_folders[self._key]
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _folder_for(path: Path) -> OutputFolder | None:
    return _open_folders.get(path.absolute().parent)


@contextmanager
def target(path: Path | str) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (e.g. for ``savefig``); on leaving
    without an error it is published (renamed over ``path``) or, inside an open
    :class:`OutputFolder`, staged for its commit. On an error it is removed."""
    path = Path(path)
    folder = _folder_for(path)
    if folder is not None:
        try:
            tmp = folder.stage(path)  # removed by the folder's close() unless committed
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {_why(exc)}") from None
        yield tmp
        return
    tmp = None
    try:
        with interrupts.critical():
            tmp = _tempfile(path.parent, path.name)
        yield tmp
        os.replace(tmp, path)
        _published.append(path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and tmp is None:
            raise UsageError(f"cannot write {path}: {_why(exc)}") from None
        raise


@contextmanager
def open_text(path: Path | str, newline: str | None = None) -> Iterator[IO[str]]:
    """A text file opened for writing whose content appears under ``path`` atomically (see
    :func:`target`); ``-`` is standard output."""
    if is_stdout(path):
        import sys

        yield sys.stdout
        sys.stdout.flush()
        return
    with target(path) as tmp:
        with open(tmp, "w", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_final(path: Path | str, text: str) -> None:
    """A command's last output file: written atomically, after which the command is done (a
    signal is then ignored, so that an exit status of 130 always means the file was not
    written)."""
    with interrupts.critical():
        write_text(path, text)
        interrupts.finished()


def write_text(path: Path | str, text: str, what: str = "") -> Path | str:
    """Write ``text`` to ``path`` atomically (``-``: standard output); an OSError becomes one
    UsageError line, ``cannot write [WHAT ]PATH: reason``."""
    try:
        with open_text(path) as fh:
            fh.write(text)
    except UsageError as exc:
        raise UsageError(f"cannot write {what + ' ' if what else ''}{path}: "
                         f"{str(exc).rsplit(': ', 1)[-1]}") from None
    except OSError as exc:
        raise UsageError(f"cannot write {what + ' ' if what else ''}{path}: {_why(exc)}") from None
    return path


__all__ = ["OutputFolder", "check_writable_file", "is_stdout", "open_text", "published",
           "target", "write_final", "write_text"]
