"""The route catalogue: schema, stable names, and the machines it builds."""

from __future__ import annotations

import pytest

from fastmmio import layout
from fastmmio.errors import UsageError
from fastmmio.guest.program import AccessKind
from fastmmio.routes import (
    EVENTFD_NAME,
    build_machine,
    get_route,
    load_catalogue,
    parse_catalogue,
    route_names,
)

# Names are a public interface (CLI, JSON): removing or renaming one is a breaking change.
REQUIRED = {
    "pio-user", "pio-in-user", "pio-eventfd-len1", "pio-eventfd-len2", "pio-eventfd-len4",
    "pio-datamatch", "pio-datamatch-miss", "mmio-user", "mmio-read-user", "mmio-eventfd-len0",
    "mmio-eventfd-len1", "mmio-eventfd-len4", "mmio-datamatch", "mmio-datamatch-miss",
    "ro-write", "ro-read", "coalesced-mmio", "coalesced-pio", "cpuid", "ram-write", "empty",
}  # fmt: skip


def test_catalogue_has_every_required_route():
    assert REQUIRED <= set(route_names())


def test_kvm_unit_tests_names():
    """kvm-unit-tests x86/vmexit.c names, as data/kut.toml maps them today: the pci tests
    write one byte (QEMU hw/misc/pci-testdev.c, IOTEST_ACCESS_WIDTH); wildcard MMIO is a
    length-0 ioeventfd today, datamatch is length 1; PIO wildcard and datamatch length 1."""
    by_kut = {r.kut: r for r in load_catalogue() if r.kut}
    assert set(by_kut) == {
        "cpuid", "mmio-no-eventfd:pci-mem", "mmio-wildcard-eventfd:pci-mem",
        "mmio-datamatch-eventfd:pci-mem", "portio-no-eventfd:pci-io",
        "portio-wildcard-eventfd:pci-io", "portio-datamatch-eventfd:pci-io",
        "vmcall", "mov_from_cr8", "mov_to_cr8", "inl_from_qemu", "inl_from_kernel",
        "outl_to_kernel",
    }  # fmt: skip
    for kut, r in by_kut.items():
        if kut.endswith(("pci-mem", "pci-io")):
            assert r.access.width == 1
            assert r.access.kind in (AccessKind.WRITE, AccessKind.OUT)
    assert by_kut["mmio-wildcard-eventfd:pci-mem"].ioeventfd.length == 0
    assert by_kut["mmio-datamatch-eventfd:pci-mem"].ioeventfd.length == 1
    assert by_kut["mmio-datamatch-eventfd:pci-mem"].ioeventfd.datamatch is not None
    assert by_kut["mmio-no-eventfd:pci-mem"].ioeventfd is None
    assert by_kut["portio-wildcard-eventfd:pci-io"].ioeventfd.length == 1


def test_negative_controls_cannot_match():
    """A DATAMATCH ioeventfd fires only on an equal value (ioeventfd_in_range() in
    virt/kvm/eventfd.c); the miss routes write another value and expect a user exit."""
    for name in ("pio-datamatch-miss", "mmio-datamatch-miss"):
        r = get_route(name)
        assert r.ioeventfd.datamatch is not None and r.ioeventfd.datamatch != r.access.value
        assert r.expect.eventfd == 0 and r.expect.user_exits == 1
        assert r.expect.exit.data == r.access.value


def test_every_ioeventfd_route_expects_one_signal_and_no_exit():
    """ioeventfds fire on writes only (virt/kvm/eventfd.c registers a write op, no read op):
    a write or OUT route signals once; a read of a region carrying one signals nothing."""
    for r in load_catalogue():
        if r.ioeventfd and not r.name.endswith("-miss"):
            expected = (0, 0) if r.access.is_read else (1, 0)
            assert (r.expect.eventfd, r.expect.user_exits) == expected, r.name


def test_ro_routes():
    w, rd = get_route("ro-write"), get_route("ro-read")
    assert w.target_region == rd.target_region == "ro-slot"
    assert w.expect.exit.kind == "mmio" and w.expect.exit.addr == layout.RO_BASE
    assert w.expect.exit.size == 1 and w.expect.exit.data == w.access.value != layout.RO_PATTERN
    assert w.expect.ro_unchanged and rd.expect.ro_unchanged
    assert rd.expect.user_exits == 0
    assert rd.expect.read_value == int.from_bytes(bytes([layout.RO_PATTERN]) * 4, "little")


def test_read_routes_expect_the_device_value_truncated_to_their_width():
    for name, width in (("mmio-read-user", 4), ("pio-in-user", 1)):
        r = get_route(name)
        mask = (1 << 8 * width) - 1
        assert r.expect.read_value == layout.DEVICE_READ_VALUE & mask
        assert r.expect.exit.data == layout.DEVICE_READ_VALUE & mask
        assert not r.expect.exit.is_write


def test_unknown_route_lists_valid_names():
    with pytest.raises(UsageError) as exc:
        get_route("mmio-teleport")
    assert "mmio-teleport" in str(exc.value)
    for name in REQUIRED:
        assert name in str(exc.value)


@pytest.mark.parametrize("cpl", [0, 3])
def test_build_machine(cpl):
    r = get_route("mmio-datamatch")
    m = build_machine(r, cpl)
    assert m.image.cpl == cpl
    assert m.spec.ioeventfds[0].name == EVENTFD_NAME
    assert m.spec.ioeventfds[0].addr == layout.DOORBELL_GPA
    assert (m.spec.ioeventfds[0].length, m.spec.ioeventfds[0].datamatch) == (1, 0)
    assert not m.spec.ioeventfds[0].pio
    slots = {s.slot: s for s in m.spec.memslots}
    assert not slots[layout.RAM_SLOT].readonly
    assert slots[layout.RO_SLOT].readonly and slots[layout.RO_SLOT].fill == layout.RO_PATTERN
    assert m.spec.mmio_holes == ((layout.MMIO_BASE, layout.MMIO_SIZE),)
    assert m.spec.done_port == layout.DONE_PORT
    pio = build_machine(get_route("pio-eventfd-len2"), cpl).spec.ioeventfds[0]
    assert pio.pio and pio.addr == layout.DOORBELL_PORT and pio.length == 2
    zone = build_machine(get_route("coalesced-pio"), cpl).spec.coalesced[0]
    assert zone.pio and zone.addr == layout.COALESCED_PORT
    zone = build_machine(get_route("coalesced-mmio"), cpl).spec.coalesced[0]
    assert not zone.pio and zone.addr == layout.COALESCED_GPA
    assert build_machine(get_route("empty"), cpl).spec.ioeventfds == ()


def test_every_route_builds_at_both_cpls():
    """Except the CPL0-only ones (MOV CR8: #GP at CPL3, SDM Vol. 2B MOV CR), refused at CPL3."""
    for r in load_catalogue():
        for cpl in (0, 3):
            if r.cpl0_only and cpl == 3:
                with pytest.raises(UsageError, match="CPL0-only"):
                    build_machine(r, cpl)
                continue
            assert build_machine(r, cpl).image.program.endswith(r.access.describe())


def test_targets_sit_in_their_regions():
    for r in load_catalogue():
        if r.access.is_memory:
            assert r.target_region in ("mmio-hole", "ro-slot", "ram")
        if r.coalesced == "mmio":
            assert r.target_region == "mmio-hole"


BASE = """
[[route]]
name = "x"
access = { kind = "write", width = 1, target = "DOORBELL_GPA", value = 0 }
"""


def test_variant_field_is_kept():
    text = BASE + 'variant = "rfc-ept-violation"\nioeventfd = { length = 0 }\n' \
        'expect = { eventfd = 1, user_exits = 0 }\n'
    (r,) = parse_catalogue(text)
    assert r.variant == "rfc-ept-violation" and not r.upstream
    assert all(r.upstream for r in load_catalogue())


@pytest.mark.parametrize(
    "extra,message",
    [
        ("ioeventfd = { length = 3 }\nexpect = { eventfd = 1 }", "length"),
        ("ioeventfd = { length = 0, datamatch = 1 }\nexpect = { eventfd = 1 }", "DATAMATCH"),
        ("ioeventfd = { length = 1, datamatch = 256 }\nexpect = { eventfd = 1 }", "fit"),
        ("expect = { eventfd = 1 }", "no ioeventfd"),
        ("expect = { user_exits = 1 }", "which kind"),
        ('expect = { user_exits = 1, exit = "io" }', "does not fit"),
        ('coalesced = "pio"\nexpect = { coalesced = true, exit = "mmio" }', "matching access"),
        ("expect = { read_value = 1 }", "read access"),
        ("expect = { bogus = 1 }", "unknown key"),
        ('expect = {}\ncolour = "red"', "unknown key"),
    ],
)
def test_schema_errors_are_usage_errors(extra, message):
    with pytest.raises(UsageError, match=message):
        parse_catalogue(BASE + extra + "\n")


def test_duplicate_and_bad_toml():
    with pytest.raises(UsageError, match="twice"):
        parse_catalogue((BASE + "expect = {}\n") * 2)
    with pytest.raises(UsageError):
        parse_catalogue("[[route]\n")
    with pytest.raises(UsageError, match="unknown kind"):
        parse_catalogue('[[route]]\nname = "y"\naccess = { kind = "mwait" }\nexpect = {}\n')
    with pytest.raises(UsageError, match="cannot read"):
        load_catalogue("/nonexistent/routes.toml")


def test_neighbour_ram_puts_a_ram_slot_in_the_doorbells_2mib_region():
    """mmio-eventfd-len0-ram-2m: slot 2 is RAM in the MMIO hole's 2 MiB region and the guest
    stores to it before every batch; other routes have no slot 2."""
    from fastmmio import layout
    from fastmmio.routes import build_machine, get_route

    m = build_machine(get_route("mmio-eventfd-len0-ram-2m"), 0)
    slot = {s.slot: s for s in m.spec.memslots}[layout.NEIGHBOUR_RAM_SLOT]
    assert slot.gpa >> 21 == layout.DOORBELL_GPA >> 21 and not slot.readonly
    assert f"touch@{layout.NEIGHBOUR_RAM_GPA:#x}+" in m.image.program
    plain = build_machine(get_route("mmio-eventfd-len0"), 0)
    assert layout.NEIGHBOUR_RAM_SLOT not in {s.slot for s in plain.spec.memslots}


@pytest.mark.parametrize("extra,msg", [
    ('neighbour_ram = "yes"', "true or false"),
    ("neighbour_ram = true", "MMIO hole"),
])
def test_neighbour_ram_errors(extra, msg):
    text = f'''[[route]]
name = "x"
access = {{ kind = "write", width = 1, target = "RO_BASE", value = 0 }}
{extra}
expect = {{ eventfd = 0, user_exits = 0 }}
'''
    with pytest.raises(UsageError, match=msg):
        parse_catalogue(text)
