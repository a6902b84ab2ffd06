"""Entry formats as declared bit layouts (data, not code).

In the spirit of amaranth ``lib/data``: a :class:`BitLayout` is a named list of :class:`Field`
declarations over a 64-bit integer, with ``get``/``set``/``build``/``decode``/``describe``.
The models keep entries as plain ``int`` (that is what memory holds); the layouts are for
building entries, reading them in tests and reports, and for deriving the masks the walkers'
hot paths use. The x86 formats (:mod:`fastmmio.x86.paging`) and the VMX ones
(:mod:`fastmmio.sim.vmx.layouts`) are declared with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fastmmio.errors import UsageError


class LayoutError(UsageError):
    """A bit-layout field name is unknown or a value does not fit its field."""


def bit_range(msb: int, lsb: int) -> int:
    """Mask of bits ``msb:lsb`` inclusive."""
    return ((1 << (msb - lsb + 1)) - 1) << lsb


@dataclass(frozen=True)
class Field:
    """One field of a :class:`BitLayout`: bits ``msb:lsb`` inclusive.

    ``address=True`` marks a physical-address field: :meth:`get` returns the bits *in place*
    (``value & mask``, a ready-to-use address) and :meth:`set` takes an in-place address.
    Other fields are shifted down to bit 0. ``names`` optionally names field values
    (memory types).
    """

    name: str
    msb: int
    lsb: int
    doc: str = ""
    address: bool = False
    names: Mapping[int, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.msb - self.lsb + 1

    @property
    def mask(self) -> int:
        """The field's bits, in place."""
        return ((1 << self.width) - 1) << self.lsb

    def get(self, value: int) -> int:
        if self.address:
            return value & self.mask
        return (value >> self.lsb) & ((1 << self.width) - 1)

    def set(self, value: int, x: int) -> int:
        """Return ``value`` with this field replaced by ``x`` (bool accepted for 1-bit fields)."""
        x = int(x)
        if self.address:
            if x & ~self.mask:
                raise LayoutError(
                    f"field {self.name}: address {x:#x} has bits outside {self.msb}:{self.lsb}"
                )
            return (value & ~self.mask) | x
        if x < 0 or x >> self.width:
            raise LayoutError(f"field {self.name}: value {x} does not fit in {self.width} bits")
        return (value & ~self.mask) | (x << self.lsb)


class BitLayout:
    """A 64-bit entry format declared as a list of fields.

    >>> from fastmmio.x86.paging import GUEST_PTE
    >>> hex(GUEST_PTE.build(p=1, rw=1, addr=0x5000))
    '0x5003'
    >>> GUEST_PTE.describe(0x5003)
    'guest PTE: p rw addr=0x5000'
    """

    def __init__(self, name: str, fields: Iterable[Field], doc: str = "", width: int = 64):
        self.name = name
        self.doc = doc
        self.width = width
        self.fields: dict[str, Field] = {}
        used = 0
        for f in fields:
            if f.name in self.fields:
                raise LayoutError(f"{name}: duplicate field {f.name}")
            if f.mask & used:
                raise LayoutError(f"{name}: field {f.name} overlaps another field")
            if f.msb >= width or f.lsb < 0 or f.msb < f.lsb:
                raise LayoutError(f"{name}: field {f.name} bits {f.msb}:{f.lsb} out of range")
            used |= f.mask
            self.fields[f.name] = f
        self.declared_mask = used

    def __getitem__(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise LayoutError(
                f"{self.name} has no field {name!r} (fields: {', '.join(self.fields)})"
            ) from None

    def __repr__(self) -> str:
        return f"BitLayout({self.name!r}, {len(self.fields)} fields)"

    def mask(self, name: str) -> int:
        return self[name].mask

    def get(self, value: int, name: str) -> int:
        return self[name].get(value)

    def set(self, value: int, name: str, x: int) -> int:
        return self[name].set(value, x)

    def build(self, **values: int) -> int:
        """Build an entry from field values (unnamed fields are 0)."""
        v = 0
        for name, x in values.items():
            v = self[name].set(v, x)
        return v

    def decode(self, value: int) -> dict[str, int]:
        """Every declared field's value, by name."""
        return {name: f.get(value) for name, f in self.fields.items()}

    def describe(self, value: int, reserved_mask: int = 0) -> str:
        """One human line: set flags by name, multi-bit fields as name=value.

        If ``reserved_mask`` is given and ``value`` sets any of those bits, they are named.
        """
        parts: list[str] = []
        for name, f in self.fields.items():
            x = f.get(value)
            if f.width == 1:
                if x:
                    parts.append(name)
            elif f.address:
                parts.append(f"{name}={x:#x}")
            elif x or f.names:
                parts.append(f"{name}={f.names.get(x, x)}" if f.names else f"{name}={x}")
        bad = value & reserved_mask
        if bad:
            parts.append(f"RESERVED={bad:#x}")
        return f"{self.name}: " + " ".join(parts) if parts else f"{self.name}: (zero)"


def flag(name: str, bit: int, doc: str) -> Field:
    return Field(name, bit, bit, doc)

