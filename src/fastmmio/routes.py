"""The route catalogue: every way a doorbell can reach a device, as data.

Routes live in ``fastmmio/data/routes.toml`` (schema in its header). A :class:`Route` says what
the guest does (an :class:`~fastmmio.guest.program.Access`), what sits at the address (the MMIO
hole, the read-only memslot, RAM; an ioeventfd; a coalesced zone), which KVM variant it needs,
its kvm-unit-tests name, and what must happen per notification (:class:`Expectation`), which
:mod:`fastmmio.bench` checks on every run.

The ioeventfd rules the catalogue is checked against come from ``kvm_assign_ioeventfd()``
(virt/kvm/eventfd.c): length 0, 1, 2, 4 or 8; no DATAMATCH with length 0 (Linux 4.4,
KVM_CAP_IOEVENTFD_ANY_LENGTH); a length-0 MMIO ioeventfd also goes on KVM_FAST_MMIO_BUS.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastmmio import layout
from fastmmio.errors import UsageError, did_you_mean
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.machine import CoalescedZone, IoEventFdSpec, Machine, MachineSpec, MemSlot

IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)  # kvm_assign_ioeventfd(): anything else is EINVAL
COALESCED_ZONE_SIZE = {"mmio": layout.PAGE_SIZE, "pio": 4}
EVENTFD_NAME = "doorbell"  # the name of a route's ioeventfd in BatchResult.eventfd_signals

# Names a route may use for an address, port or value, resolved from fastmmio.layout.
_SYMBOLS = {
    name: getattr(layout, name)
    for name in (
        "DOORBELL_PORT", "COALESCED_PORT", "DOORBELL_GPA", "COALESCED_GPA", "RO_BASE",
        "DATA_GPA", "MMIO_BASE", "ELCR_PORT",
    )
}  # fmt: skip


@dataclass(frozen=True)
class IoEventFdUse:
    """The route's ioeventfd: on KVM_PIO_BUS for port accesses, KVM_MMIO_BUS otherwise."""

    length: int
    datamatch: int | None = None
    addr: int | None = None  # default: the access's target

    @property
    def wildcard(self) -> bool:
        return self.datamatch is None


@dataclass(frozen=True)
class ExitExpectation:
    """What every user exit of a route must look like (``struct kvm_run`` io/mmio fields)."""

    kind: str  # "io" | "mmio"
    addr: int
    size: int
    is_write: bool
    data: int


@dataclass(frozen=True)
class Expectation:
    """Per notification: what the route must produce."""

    eventfd: int  # signals of the route's ioeventfd per access
    user_exits: int  # returns to userspace per access (0 or 1); ignored when coalesced
    coalesced: bool = False  # each access is a ring entry or (ring full) a user exit
    exit: ExitExpectation | None = None
    ro_unchanged: bool = False
    read_value: int | None = None


@dataclass(frozen=True)
class Route:
    name: str
    description: str
    access: Access
    expect: Expectation
    ioeventfd: IoEventFdUse | None = None
    coalesced: str | None = None  # "mmio" | "pio"
    kut: str | None = None  # kvm-unit-tests x86/vmexit.c name
    variant: str | None = None  # KVM variant needed; None = upstream KVM
    irqchip: bool = False  # needs the in-kernel irqchip (KVM_CREATE_IRQCHIP)
    # RAM (slot 2) shares the MMIO hole's 2 MiB region, and the guest stores to it before
    # every batch: the EPT then has a page table under the doorbell's PDE
    neighbour_ram: bool = False

    @property
    def upstream(self) -> bool:
        """Runs on unmodified KVM (a real host), not only under a simulated variant."""
        return self.variant is None

    @property
    def hypercall(self) -> bool:
        """The guest access is a VMCALL (KVM's hypercall handler)."""
        return self.access.kind is AccessKind.VMCALL

    @property
    def cpl0_only(self) -> bool:
        """The guest access raises #GP above CPL0 (MOV CR8): the route cannot run at CPL3."""
        return self.access.cpl0_only

    @property
    def target_region(self) -> str:
        """Where the access lands: port, mmio-hole, ro-slot, ram, or none."""
        a = self.access
        if a.is_pio:
            return "port"
        if not a.is_memory:
            return "none"
        if layout.MMIO_BASE <= a.target < layout.MMIO_BASE + layout.MMIO_SIZE:
            return "mmio-hole"
        if layout.RO_BASE <= a.target < layout.RO_BASE + layout.RO_SIZE:
            return "ro-slot"
        return "ram"


def _mask(width: int) -> int:
    return (1 << (8 * width)) - 1


def _number(value: Any, where: str, width: int = 8) -> int:
    """An int, or a layout name; DEVICE_READ_VALUE is truncated and RO_PATTERN repeated to
    ``width`` bytes (what a read of that width returns)."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, int):
        return value
    if value == "DEVICE_READ_VALUE":
        return layout.DEVICE_READ_VALUE & _mask(width)
    if value == "RO_PATTERN":
        return int.from_bytes(bytes([layout.RO_PATTERN]) * width, "little")
    if isinstance(value, str) and value in _SYMBOLS:
        return _SYMBOLS[value]
    raise UsageError(f"{where}: unknown value {value!r} (a number or one of {', '.join(_SYMBOLS)})")


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _parse_route(raw: dict, index: int) -> Route:
    name = raw.get("name")
    where = f"route {name or '#' + str(index)}"
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: missing name")
    _check_keys(raw, {"name", "description", "kut", "access", "ioeventfd", "coalesced",
                      "variant", "irqchip", "expect", "neighbour_ram"}, where)
    if not isinstance(raw.get("access"), dict) or not isinstance(raw.get("expect"), dict):
        raise UsageError(f"{where}: needs an access table and an expect table")

    ra = raw["access"]
    _check_keys(ra, {"kind", "width", "target", "value"}, f"{where}.access")
    try:
        kind = AccessKind(ra.get("kind"))
    except ValueError:
        raise UsageError(f"{where}.access: unknown kind {ra.get('kind')!r}; one of "
                         f"{', '.join(k.value for k in AccessKind)}") from None
    width = ra.get("width", 0)
    access = Access(
        kind=kind,
        width=width,
        target=_number(ra.get("target", 0), f"{where}.access.target"),
        value=_number(ra.get("value", 0), f"{where}.access.value", width or 8),
    )

    ioeventfd = None
    if "ioeventfd" in raw:
        ri = raw["ioeventfd"]
        _check_keys(ri, {"length", "datamatch", "addr"}, f"{where}.ioeventfd")
        length = ri.get("length")
        if length not in IOEVENTFD_LENGTHS:
            raise UsageError(f"{where}.ioeventfd: length must be one of {IOEVENTFD_LENGTHS}")
        datamatch = ri.get("datamatch")
        if datamatch is not None:
            datamatch = _number(datamatch, f"{where}.ioeventfd.datamatch")
            if length == 0:
                raise UsageError(f"{where}.ioeventfd: length 0 with DATAMATCH is rejected by KVM")
            if not 0 <= datamatch <= _mask(length):
                raise UsageError(f"{where}.ioeventfd: datamatch does not fit {length} byte(s)")
        if not (access.is_pio or access.is_memory):
            raise UsageError(f"{where}: an ioeventfd needs a port or memory access")
        addr = _number(ri["addr"], f"{where}.ioeventfd.addr") if "addr" in ri else None
        ioeventfd = IoEventFdUse(length=length, datamatch=datamatch, addr=addr)

    coalesced = raw.get("coalesced")
    if coalesced is not None:
        if coalesced not in COALESCED_ZONE_SIZE:
            raise UsageError(f"{where}: coalesced must be 'mmio' or 'pio'")
        if (coalesced == "pio") != access.is_pio:
            raise UsageError(f"{where}: a coalesced {coalesced} zone needs a matching access")

    re_ = raw["expect"]
    _check_keys(re_, {"eventfd", "user_exits", "coalesced", "exit", "ro_unchanged",
                      "read_value"}, f"{where}.expect")
    exit_exp = None
    if "exit" in re_:
        exit_exp = _parse_exit(re_["exit"], access, f"{where}.expect.exit")
    read_value = None
    if "read_value" in re_:
        if not access.is_read:
            raise UsageError(f"{where}.expect: read_value needs a read access")
        read_value = _number(re_["read_value"], f"{where}.expect.read_value", access.width)
    is_coalesced = bool(re_.get("coalesced", False))
    if is_coalesced != (coalesced is not None):
        raise UsageError(f"{where}.expect: coalesced must be true exactly when a zone is set")
    expect = Expectation(
        eventfd=int(re_.get("eventfd", 0)),
        user_exits=int(re_.get("user_exits", 0)),
        coalesced=is_coalesced,
        exit=exit_exp,
        ro_unchanged=bool(re_.get("ro_unchanged", False)),
        read_value=read_value,
    )
    if expect.eventfd and ioeventfd is None:
        raise UsageError(f"{where}.expect: eventfd signals expected but no ioeventfd")
    if (expect.user_exits or expect.coalesced) and exit_exp is None:
        raise UsageError(f"{where}.expect: user exits expected: say which kind (exit = ...)")
    neighbour_ram = raw.get("neighbour_ram", False)
    if not isinstance(neighbour_ram, bool):
        raise UsageError(f"{where}: neighbour_ram must be true or false")
    if neighbour_ram and not (access.is_memory and layout.MMIO_BASE <= access.target
                              < layout.MMIO_BASE + layout.MMIO_SIZE):
        raise UsageError(f"{where}: neighbour_ram needs an access to the MMIO hole")
    return Route(
        name=name,
        description=str(raw.get("description", "")),
        neighbour_ram=neighbour_ram,
        access=access,
        expect=expect,
        ioeventfd=ioeventfd,
        coalesced=coalesced,
        kut=raw.get("kut") or _kut_name(name),
        variant=raw.get("variant") or None,
        irqchip=_irqchip(raw.get("irqchip", False), where),
    )


def _kut_name(route: str) -> str | None:
    """The kvm-unit-tests name data/kut.toml maps to ``route`` today."""
    from fastmmio.kut import load_kut_table

    return load_kut_table().name_for_route(route)


def _irqchip(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where}: irqchip must be true or false")
    return value


def _parse_exit(raw: Any, access: Access, where: str) -> ExitExpectation:
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict) or raw.get("kind") not in ("io", "mmio"):
        raise UsageError(f"{where}: kind must be 'io' or 'mmio'")
    _check_keys(raw, {"kind", "addr", "size", "data", "write"}, where)
    if (raw["kind"] == "io") != access.is_pio:
        raise UsageError(f"{where}: an {raw['kind']} exit does not fit a {access.kind.value} access")
    default_data = layout.DEVICE_READ_VALUE & _mask(access.width) if access.is_read else access.value
    return ExitExpectation(
        kind=raw["kind"],
        addr=_number(raw.get("addr", access.target), f"{where}.addr"),
        size=int(raw.get("size", access.width)),
        is_write=bool(raw.get("write", not access.is_read)),
        data=_number(raw.get("data", default_data), f"{where}.data", access.width),
    )


def parse_catalogue(text: str, source: str = "<string>") -> tuple[Route, ...]:
    """Parse catalogue TOML text; every error is a :class:`UsageError` naming the route."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: {exc}") from None
    raw_routes = doc.get("route")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise UsageError(f"{source}: no [[route]] tables")
    routes = tuple(_parse_route(r, i) for i, r in enumerate(raw_routes))
    seen: set[str] = set()
    for r in routes:
        if r.name in seen:
            raise UsageError(f"{source}: route {r.name} defined twice")
        seen.add(r.name)
    return routes


@lru_cache(maxsize=None)
def _bundled_catalogue() -> tuple[Route, ...]:
    text = resources.files("fastmmio").joinpath("data/routes.toml").read_text()
    return parse_catalogue(text, "routes.toml")


def read_catalogue_file(path: str | Path) -> tuple[Route, ...]:
    """The routes of the TOML file at ``path`` (the schema of ``data/routes.toml``, validated
    the same way); every problem is a :class:`UsageError` naming the file."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():  # a device or FIFO: never ends
        raise UsageError(f"cannot read route catalogue {path}: not a regular file")
    try:
        text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read route catalogue {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read route catalogue {path}: not UTF-8 text") from None
    return parse_catalogue(text, str(path))


# Routes a user added with --routes-file (see add_user_routes), after the bundled ones.
_user_routes: tuple[Route, ...] = ()


def load_catalogue(path: str | None = None) -> tuple[Route, ...]:
    """The catalogue: ``fastmmio/data/routes.toml`` and the user's routes added with
    :func:`user_routes`, or only the TOML file at ``path``."""
    if path is None:
        return _bundled_catalogue() + _user_routes
    return read_catalogue_file(path)


@contextmanager
def user_routes(path: str | Path) -> Iterator[tuple[Route, ...]]:
    """Within the block, the catalogue (:func:`load_catalogue`, :func:`get_route`) is the
    bundled one *and* the routes of the file at ``path`` (``--routes-file``): a file adds
    routes, it does not replace the bundled ones (the verdict and the calibration need their
    doorbell and reference routes). A name the bundled catalogue already has is a
    :class:`UsageError`; so is every problem of the file."""
    global _user_routes
    routes = read_catalogue_file(path)
    bundled = {r.name for r in _bundled_catalogue()}
    taken = [r.name for r in routes if r.name in bundled]
    if taken:
        raise UsageError(f"route catalogue {path}: route {taken[0]} is already in the bundled "
                         "catalogue (a routes file adds routes: give yours another name)")
    saved = _user_routes
    _user_routes = routes
    try:
        yield routes
    finally:
        _user_routes = saved


def route_names(routes: tuple[Route, ...] | None = None) -> list[str]:
    return [r.name for r in (routes if routes is not None else load_catalogue())]


def get_route(name: str, routes: tuple[Route, ...] | None = None) -> Route:
    """The route called ``name``; an unknown name is a :class:`UsageError` listing them all."""
    routes = routes if routes is not None else load_catalogue()
    for r in routes:
        if r.name == name:
            return r
    names = route_names(routes)
    raise UsageError(f"unknown route {name!r}{did_you_mean(name, names)}; valid routes: "
                     f"{', '.join(names)}")


def build_machine(route: Route, cpl: int) -> Machine:
    """The guest image for ``route`` at ``cpl`` and what surrounds it: the RAM slot, the
    read-only slot (filled with RO_PATTERN), the MMIO hole, the route's ioeventfd and
    coalesced zone."""
    touch = (layout.NEIGHBOUR_RAM_GPA,) if route.neighbour_ram else ()
    image = build_image(route.access, cpl, touch=touch)
    ioeventfds: tuple[IoEventFdSpec, ...] = ()
    if route.ioeventfd is not None:
        e = route.ioeventfd
        ioeventfds = (
            IoEventFdSpec(
                name=EVENTFD_NAME,
                pio=route.access.is_pio,
                addr=e.addr if e.addr is not None else route.access.target,
                length=e.length,
                datamatch=e.datamatch,
            ),
        )
    coalesced: tuple[CoalescedZone, ...] = ()
    if route.coalesced is not None:
        coalesced = (
            CoalescedZone(
                addr=route.access.target,
                size=COALESCED_ZONE_SIZE[route.coalesced],
                pio=route.coalesced == "pio",
            ),
        )
    neighbour = ((MemSlot(layout.NEIGHBOUR_RAM_SLOT, layout.NEIGHBOUR_RAM_GPA,
                          layout.NEIGHBOUR_RAM_SIZE),) if route.neighbour_ram else ())
    spec = MachineSpec(
        memslots=(
            MemSlot(layout.RAM_SLOT, layout.RAM_BASE, layout.RAM_SIZE),
            MemSlot(layout.RO_SLOT, layout.RO_BASE, layout.RO_SIZE, readonly=True,
                    fill=layout.RO_PATTERN),
        ) + neighbour,
        ioeventfds=ioeventfds,
        coalesced=coalesced,
        done_port=layout.DONE_PORT,
        device_read_value=layout.DEVICE_READ_VALUE,
        mmio_holes=((layout.MMIO_BASE, layout.MMIO_SIZE),),
        irqchip=route.irqchip,
    )
    return Machine(image=image, spec=spec)
