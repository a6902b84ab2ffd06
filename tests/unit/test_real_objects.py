"""Pieces of the real backend that need no KVM: the ioeventfd rule names, the eventfd counter,
the binary-stats file format, the guest page walk used in error messages."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from fastmmio.errors import HostError
from fastmmio.kvmabi import collides
from fastmmio.real import binding as B
from fastmmio.real.backend import RealBackend
from fastmmio.routes import build_machine, get_route
from fastmmio.real import objects as O
from fastmmio.real.runloop import guest_linear_to_physical
from fastmmio.real.stats import KvmStats


def ev(pio=False, addr=0x1000, length=4, datamatch=None, **kw):
    return O.IoEventFd("t", pio, addr, length, datamatch, **kw)


@pytest.mark.parametrize(
    "new,err,expected",
    [
        (dict(length=3), errno.EINVAL, O.RULE_LENGTH),
        (dict(length=0, datamatch=1), errno.EINVAL, O.RULE_LEN0_DATAMATCH),
        (dict(addr=(1 << 64) - 1, length=2), errno.EINVAL, O.RULE_WRAP),
        (dict(extra_flags=1 << 7), errno.EINVAL, O.RULE_FLAGS),
        (dict(), errno.ENOSPC, O.RULE_BUS_FULL),
    ],
)
def test_explain_assign_einval_in_kernel_order(new, err, expected):
    """kvm_assign_ioeventfd checks length, wrap, flags, length 0 with DATAMATCH, in that order."""
    with ev(**new) as e:
        assert O.explain_ioeventfd_error(err, e, [], False).startswith(expected)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (dict(), dict(), O.RULE_DUPLICATE),
        (dict(), dict(datamatch=3), O.RULE_DATAMATCH_ON_WILDCARD),
        (dict(datamatch=3), dict(), O.RULE_WILDCARD_ON_DATAMATCH),
        (dict(datamatch=3), dict(datamatch=3), O.RULE_DUPLICATE),
        (dict(length=0), dict(length=2, datamatch=1), O.RULE_LENGTH0_COLLISION),
        (dict(length=8), dict(length=0), O.RULE_LENGTH0_COLLISION),
    ],
)
def test_explain_collision(old, new, expected):
    """ioeventfd_check_collision: same bus and address; length 0 on either side, or equal
    length with a wildcard on either side or equal datamatch."""
    with ev(**old) as a, ev(**new) as b:
        msg = O.explain_ioeventfd_error(errno.EEXIST, b, [a], False)
        assert msg.startswith(expected) and "existing" in msg


def test_collision_needs_same_bus_and_address():
    with ev() as a, ev(pio=True) as b, ev(addr=0x1004) as c, ev(length=2) as d:
        assert collides(a.key, a.key)
        assert not collides(a.key, b.key) and not collides(a.key, c.key) and not collides(a.key, d.key)


def test_explain_deassign_unknown():
    with ev() as e:
        assert O.explain_ioeventfd_error(errno.ENOENT, e, [], True) == O.RULE_UNKNOWN_DEASSIGN


def test_ioeventfd_args_flags():
    """struct kvm_ioeventfd: PIO and DATAMATCH flags, DEASSIGN for deassign."""
    with ev(pio=True, datamatch=5, addr=0xE000, length=2) as e:
        a = e.args()
        assert a.flags == B.KVM_IOEVENTFD_FLAG_PIO | B.KVM_IOEVENTFD_FLAG_DATAMATCH
        assert (a.addr, a.len, a.datamatch, a.fd) == (0xE000, 2, 5, e.fd)
        assert e.args(deassign=True).flags & B.KVM_IOEVENTFD_FLAG_DEASSIGN


def test_eventfd_counter_reads_and_resets():
    """eventfd(2): a read returns the counter and resets it; empty non-blocking reads give 0."""
    with ev() as e:
        assert e.read() == 0
        os.eventfd_write(e.fd, 3)
        os.eventfd_write(e.fd, 2)
        assert e.read() == 5
        assert e.read() == 0
    assert e.fd == -1 and e.read() == 0


def test_shared_eventfd_is_not_closed_by_its_registration():
    fd = os.eventfd(0)
    try:
        e = ev(eventfd=fd)
        e.close()
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def _stats_file(tmp_path, stats):
    """A file laid out as KVM_GET_STATS_FD's (header, id, descriptors, data)."""
    name_size = 48
    hdr_size = ctypes.sizeof(B.kvm_stats_header)
    desc_size = ctypes.sizeof(B.kvm_stats_desc) + name_size
    id_off = hdr_size
    desc_off = id_off + name_size
    data_off = desc_off + desc_size * len(stats)
    hdr = B.kvm_stats_header(0, name_size, len(stats), id_off, desc_off, data_off)
    out = bytearray(bytes(hdr)) + b"kvm-1/vcpu-0".ljust(name_size, b"\0")
    data = bytearray()
    for name, flags, values in stats:
        d = B.kvm_stats_desc(flags, 0, len(values), len(data), 0)
        out += bytes(d) + name.encode().ljust(name_size, b"\0")
        data += struct.pack(f"<{len(values)}Q", *values)
    path = tmp_path / "stats"
    path.write_bytes(bytes(out + data))
    return os.open(path, os.O_RDONLY)


def test_stats_file_format(tmp_path):
    """Documentation/virt/kvm/api.rst KVM_GET_STATS_FD: header, id, descriptors (name_size-byte
    names), values at data_offset + desc.offset; histograms are left out of snapshots."""
    fd = _stats_file(
        tmp_path,
        [
            ("exits", B.KVM_STATS_TYPE_CUMULATIVE, [7]),
            ("blocking", B.KVM_STATS_TYPE_INSTANT, [1]),
            ("hist", B.KVM_STATS_TYPE_LOG_HIST, [1, 2, 3]),
            ("io_exits", B.KVM_STATS_TYPE_CUMULATIVE, [2]),
        ],
    )
    with KvmStats(fd) as s:
        assert s.id == "kvm-1/vcpu-0"
        assert [d.name for d in s.descs] == ["exits", "blocking", "hist", "io_exits"]
        assert s.descs[2].kind == "log-hist" and s.descs[2].size == 3
        snap = s.snapshot()
        assert snap == {"exits": 7, "blocking": 1, "io_exits": 2}
        before = {"exits": 5, "blocking": 9, "io_exits": 2}
        assert s.delta(before, snap) == {"exits": 2}  # instant values are not differences
    assert s.fd == -1


def test_guest_page_walk_for_error_messages():
    """IA-32e 4-level walk (SDM Vol. 3A 4.5): 4 KiB leaf, 2 MiB PS leaf, not-present -> None."""
    mem = bytearray(0x10000)

    class FakeVm:
        def read(self, gpa, size):
            if gpa + size > len(mem):
                raise O.UsageError("outside")
            return bytes(mem[gpa : gpa + size])

    def put(gpa, val):
        struct.pack_into("<Q", mem, gpa, val)

    put(0x1000, 0x2000 | 7)  # PML4[0] -> PDPT
    put(0x2000, 0x3000 | 7)  # PDPT[0] -> PD
    put(0x3000, 0x4000 | 7)  # PD[0] -> PT
    put(0x4000 + 8 * 0x10, 0x9000 | 7)  # PT[0x10] -> 0x9000
    put(0x3000 + 8, 0x0 | 0x87)  # PD[1]: 2 MiB page at 0
    vm = FakeVm()
    assert guest_linear_to_physical(vm, 0x1000, 0x10123) == 0x9123
    assert guest_linear_to_physical(vm, 0x1000, 0x200456) == 0x456
    assert guest_linear_to_physical(vm, 0x1000, 0x11000) is None


def test_missing_device_is_host_error(tmp_path):
    """ENOENT on the device path: one-line HostError, no traceback material."""
    path = str(tmp_path / "no-kvm")
    with pytest.raises(HostError) as info:
        RealBackend(device=path).check()
    assert path in str(info.value) and "ENOENT" in str(info.value)
    with pytest.raises(HostError):
        RealBackend(device=path).open(build_machine(get_route("empty"), 3))


def test_non_kvm_device_is_host_error():
    """A device that is not KVM answers KVM_GET_API_VERSION with an error: HostError."""
    with pytest.raises(HostError) as info:
        O.Kvm("/dev/null")
    assert "not a KVM device" in str(info.value)
