"""fastmmio.real.exitpath without a KVM device: which per-exit path a run loop gets, and the
layout handed to the compiled one (every offset from fastmmio.real.binding)."""

from __future__ import annotations

import importlib
import sys

import pytest

import fastmmio.real

from fastmmio.errors import UsageError
from fastmmio.real import binding as B
from fastmmio.real import exitpath


def test_choose_without_the_extension(monkeypatch):
    """A module that cannot be imported (an install without a compiler) leaves the pure-Python
    loop: ``auto`` is ``python``, ``c`` is refused with the reason."""
    monkeypatch.setitem(sys.modules, "fastmmio.real._exitpath", None)  # import fails
    monkeypatch.delattr(fastmmio.real, "_exitpath", raising=False)
    try:
        fresh = importlib.reload(exitpath)
        assert fresh.compiled is None and not fresh.available()
        monkeypatch.delenv(fresh.ENV, raising=False)
        assert fresh.choose("auto") == "python"
        assert fresh.choose("python") == "python"
        with pytest.raises(UsageError, match="not built"):
            fresh.choose("c")
    finally:
        monkeypatch.undo()
        importlib.reload(exitpath)


def test_choose_with_the_extension(monkeypatch):
    monkeypatch.setattr(exitpath, "compiled", object())
    monkeypatch.delenv(exitpath.ENV, raising=False)
    assert exitpath.choose() == "c"
    assert exitpath.choose("python") == "python"
    monkeypatch.setenv(exitpath.ENV, "python")
    assert exitpath.choose() == "python"  # the environment overrides auto only
    assert exitpath.choose("c") == "c"


def test_choose_refuses_unknown_engines(monkeypatch):
    with pytest.raises(UsageError, match="choose one of auto, c, python"):
        exitpath.choose("rust")
    monkeypatch.setenv(exitpath.ENV, "fast")
    with pytest.raises(UsageError, match="'fast'"):
        exitpath.choose()


def test_layout_is_the_bindings_kvm_run():
    """KVM_RUN's number, the exit reasons and the io/mmio members at their uapi offsets
    (struct kvm_run: exit_reason at 8, the exit union at 32)."""
    lay = exitpath.layout()
    assert lay[0] == B.KVM_RUN == 0xAE80
    assert lay[1] == 8 and lay[2:5] == (B.KVM_EXIT_IO, B.KVM_EXIT_MMIO, B.KVM_EXIT_IO_OUT)
    assert lay[5:10] == (32, 33, 34, 36, 40)  # io: direction, size, port, count, data_offset
    assert lay[10:14] == (32, 40, 48, 52)  # mmio: phys_addr, data[8], len, is_write
    assert lay[14:] == (8, 24, 0, 8, 12, 16)  # ring header; entry size; entry fields
    if exitpath.available():
        assert len(lay) == exitpath.compiled.LAYOUT_FIELDS
