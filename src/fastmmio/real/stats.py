"""KVM binary statistics (KVM_GET_STATS_FD on a VM or a vCPU; Documentation/virt/kvm/api.rst
"KVM_GET_STATS_FD", virt/kvm/binary_stats.c).

The stats file starts with ``struct kvm_stats_header``; ``num_desc`` descriptors (each
``struct kvm_stats_desc`` followed by a ``name_size``-byte name) sit at ``desc_offset``; the
values, ``size`` u64s per descriptor, at ``data_offset + desc.offset``. Header and descriptors
never change for an fd, so they are read once; a snapshot is one ``pread`` of the data block.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from fastmmio.real import binding as B

_TYPE_NAMES = {
    B.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    B.KVM_STATS_TYPE_INSTANT: "instant",
    B.KVM_STATS_TYPE_PEAK: "peak",
    B.KVM_STATS_TYPE_LINEAR_HIST: "linear-hist",
    B.KVM_STATS_TYPE_LOG_HIST: "log-hist",
}


@dataclass(frozen=True)
class StatDesc:
    name: str
    kind: str  # cumulative, instant, peak, linear-hist, log-hist
    unit: int  # KVM_STATS_UNIT_* >> KVM_STATS_UNIT_SHIFT
    exponent: int
    size: int  # number of u64 values
    offset: int  # from data_offset


class KvmStats:
    """One stats fd: its id string, descriptors, and snapshots of the scalar values.

    Owns the fd (``close()`` closes it)."""

    def __init__(self, fd: int):
        self.fd = fd
        hdr = B.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(B.kvm_stats_header), 0))
        self.id = os.pread(fd, hdr.name_size, hdr.id_offset).split(b"\0", 1)[0].decode(errors="replace")
        dsize = ctypes.sizeof(B.kvm_stats_desc) + hdr.name_size
        raw = os.pread(fd, dsize * hdr.num_desc, hdr.desc_offset)
        descs: list[StatDesc] = []
        for i in range(hdr.num_desc):
            d = B.kvm_stats_desc.from_buffer_copy(raw, i * dsize)
            name_raw = raw[i * dsize + ctypes.sizeof(B.kvm_stats_desc) : (i + 1) * dsize]
            name = name_raw.split(b"\0", 1)[0].decode(errors="replace")
            descs.append(
                StatDesc(
                    name=name,
                    kind=_TYPE_NAMES.get(d.flags & B.KVM_STATS_TYPE_MASK, "unknown"),
                    unit=(d.flags & B.KVM_STATS_UNIT_MASK) >> B.KVM_STATS_UNIT_SHIFT,
                    exponent=d.exponent,
                    size=d.size,
                    offset=d.offset,
                )
            )
        self.descs = descs
        self._data_offset = hdr.data_offset
        self._data_size = max((d.offset + 8 * d.size for d in descs), default=0)
        # Scalars only (size 1): histograms are not part of a snapshot.
        self._scalars = [d for d in descs if d.size == 1]
        self._cumulative = frozenset(d.name for d in self._scalars if d.kind == "cumulative")
        self._scalar_offsets = [d.offset for d in self._scalars]
        self._names = [d.name for d in self._scalars]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def snapshot(self) -> dict[str, int]:
        """Every scalar statistic by name, now."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {name: int.from_bytes(data[off : off + 8], "little") for name, off in zip(self._names, self._scalar_offsets)}

    def delta(self, before: dict[str, int], after: dict[str, int] | None = None) -> dict[str, int]:
        """Non-zero increases of the cumulative statistics between two snapshots (``after``
        defaults to now). Instant and peak values are not differences and are left out."""
        after = self.snapshot() if after is None else after
        out = {}
        for name in self._names:
            if name in self._cumulative:
                d = after.get(name, 0) - before.get(name, 0)
                if d:
                    out[name] = d
        return out

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "KvmStats":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
