"""``fastmmio explain``: one steady-state notification, in order, priced step by step."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fastmmio.cli import main
from fastmmio.costs import CostModel
from fastmmio.errors import UsageError
from fastmmio.explain import EventTrace, ExplainOptions, describe_event, explain
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.events import PAGING_LEVELS


def _opts(**kw) -> ExplainOptions:
    profile = kw.pop("profile", "skylake-sp")
    return ExplainOptions(sim=SimOptions(**kw), profile=profile)


def _subsequence(names: list[str], wanted: list[str]) -> bool:
    """``wanted`` appears in ``names`` in this order (other events may come between)."""
    it = iter(names)
    return all(any(n == w for n in it) for w in wanted)


# -- the ordered event log ----------------------------------------------------------------


def test_event_trace_logs_every_change_in_order_while_on():
    c: Counter[str] = Counter(a=1)
    same = EventTrace.install(c)
    assert same is c and c["a"] == 1
    c["a"] += 1  # not tracing: nothing logged
    log: list = []
    c.log = log
    c["b"] += 2
    c["a"] += 1
    c["b"] += 0  # no change, no entry
    c.log = None
    c["a"] += 5
    assert log == [("event", "b", 2), ("event", "a", 1)]
    assert c == Counter(a=8, b=2)


def test_event_trace_nets_out_counts_put_back_by_clear_and_update():
    """sim/cpu's instruction-length read takes a snapshot, translates, then clear() and
    update(snapshot): the look-up's events are taken back, so the log must not keep them."""
    c = EventTrace.install(Counter(x=3))
    log: list = []
    c.log = log
    c["y"] += 1
    snap = Counter(c)
    c["tlb.combined.hit"] += 1
    c["y"] += 1
    c.clear()
    c.update(snap)
    assert c == Counter(x=3, y=1)
    assert log == [("event", "y", 1)]


# -- the recorded notification --------------------------------------------------------------


CASES = [
    ("mmio-eventfd-len0", {}),
    ("mmio-eventfd-len0", {"caches": "none", "vpid": False}),
    ("mmio-eventfd-len0", {"nested": True}),
    ("mmio-eventfd-len1", {"variant": "upstream-2013"}),
    ("pio-eventfd-len1", {}),
    ("ro-write", {}),
    ("mmio-read-user", {}),
    ("coalesced-mmio", {}),
    ("cpuid", {}),
    ("ram-write", {}),
]


@pytest.mark.parametrize("route,kw", CASES)
def test_steps_add_up_to_the_cost_models_total(route, kw):
    """Each event row is count x the profile's unit price; the rows sum to
    CostModel.price(events of the notification, 1).cycles, and the rows' events are exactly
    the notification's event vector."""
    e = explain(route, _opts(**kw))
    model = CostModel("skylake-sp", nested=kw.get("nested", False))
    assert sum(s.cycles for s in e.steps) == pytest.approx(model.price(e.events, 1).cycles, rel=1e-12)
    assert e.total_cycles == pytest.approx(model.price(e.events, 1).cycles, rel=1e-12)
    from_rows: Counter[str] = Counter()
    for s in e.steps:
        if s.event is not None:
            assert s.cycles == pytest.approx(s.count * model.unit(s.event))
            from_rows[s.event] += s.count
    assert from_rows == Counter(e.events)
    assert [s.index for s in e.steps] == list(range(1, len(e.steps) + 1))


@pytest.mark.parametrize("route,kw", [c for c in CASES if c[1].get("caches") is None])
def test_the_notification_is_a_steady_state_one(route, kw):
    """The recorded notification's exits and KVM events are those of every notification of a
    steady-state batch (N of them per batch), so nothing of the batch's set-up or of
    first-touch faults is in it."""
    e = explain(route, _opts(**kw))
    n = 16
    with SimBackend(SimOptions(**kw)).open(build_machine(get_route(route), 0)) as s:
        s.run_batch(8)
        batch = s.run_batch(n).events
    for name, count in batch.items():
        if name.startswith(("exit.", "kvm.")):
            assert count == n * e.events.get(name, 0), name
    for name, count in e.events.items():
        if name.startswith(("exit.", "kvm.")):
            assert batch.get(name, 0) == n * count, name


def test_upstream_mmio_eventfd_len0_takes_the_fast_mmio_bus():
    """68c3b4d1 (KVM: VMX: speed up wildcard MMIO EVENTFD): handle_ept_misconfig writes length 0
    on KVM_FAST_MMIO_BUS; the ioeventfd fires and the instruction is skipped by the VM-exit
    instruction length, with no emulator, then the guest is re-entered."""
    e = explain("mmio-eventfd-len0", _opts())
    names = e.event_names
    assert _subsequence(names, ["guest.insn", "exit.EPT_MISCONFIG", "kvm.handler.ept_misconfig",
                                "kvm.bus.lookup.KVM_FAST_MMIO_BUS", "kvm.eventfd.signal",
                                "kvm.skip.vmcs_length", "vmentry", "guest.insn"]), names
    assert not any(n.startswith("kvm.emulate") for n in names)
    assert "kvm.bus.lookup.KVM_MMIO_BUS" not in names
    assert names.count("exit.EPT_MISCONFIG") == 1
    whats = [s.what for s in e.steps]
    assert _subsequence(whats, ["KVM step: fast_mmio_bus", "KVM step: fast_mmio_bus:hit",
                                "KVM step: skip:vmcs_length"])
    ex = next(s for s in e.steps if s.event == "exit.EPT_MISCONFIG")
    assert "reason 49" in ex.detail and "GPA 0x400000" in ex.detail and "qual 0x0" in ex.detail
    first = next(s for s in e.steps if s.event == "guest.insn")
    assert first.what.startswith("guest: mov [rsi]")


def test_upstream_2013_emulates_the_mmio_write_on_the_mmio_bus():
    """Before 68c3b4d1 there was no KVM_FAST_MMIO_BUS: handle_ept_misconfig goes to
    kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK), the emulator fetches and decodes the store and
    vcpu_mmio_write finds the ioeventfd on KVM_MMIO_BUS. The 2013 kvm-unit-tests wildcard
    test used length 1 (length 0 came with f848a5a8, 2014), so that is the route here."""
    e = explain("mmio-eventfd-len1", _opts(variant="upstream-2013"))
    names = e.event_names
    assert _subsequence(names, ["exit.EPT_MISCONFIG", "kvm.handler.ept_misconfig",
                                "kvm.mmu.page_fault", "kvm.emulate.fetch", "kvm.emulate.decode",
                                "kvm.bus.lookup.KVM_MMIO_BUS", "kvm.eventfd.signal",
                                "vmentry"]), names
    assert "kvm.bus.lookup.KVM_FAST_MMIO_BUS" not in names
    assert "kvm.skip.vmcs_length" not in names  # the emulator advances RIP itself


def test_upstream_length_1_ioeventfd_misses_the_fast_bus_then_emulates():
    """Only length-0 MMIO ioeventfds go on KVM_FAST_MMIO_BUS (Linux 4.4): a length-1 one costs a
    fast-bus look-up that misses, then the emulator and KVM_MMIO_BUS."""
    names = explain("mmio-eventfd-len1", _opts()).event_names
    assert _subsequence(names, ["exit.EPT_MISCONFIG", "kvm.bus.lookup.KVM_FAST_MMIO_BUS",
                                "kvm.emulate.decode", "kvm.bus.lookup.KVM_MMIO_BUS",
                                "kvm.eventfd.signal", "vmentry"]), names


def test_length_0_ioeventfd_under_upstream_2013_is_a_usage_error():
    """f848a5a8 (KVM_CAP_IOEVENTFD_NO_LENGTH, 2014): KVM of 2013 refused length 0 (EINVAL)."""
    with pytest.raises(UsageError, match="upstream-2013.*EINVAL"):
        explain("mmio-eventfd-len0", _opts(variant="upstream-2013"))


def test_nested_kvm_skips_the_misconfiguration_by_decoding():
    """d391f1207067: when KVM runs as a guest, the VM-exit instruction length of an EPT
    misconfiguration is not trusted; the skip decodes the instruction (EMULTYPE_SKIP)."""
    e = explain("mmio-eventfd-len0", _opts(nested=True))
    names = e.event_names
    assert _subsequence(names, ["kvm.eventfd.signal", "kvm.emulate.decode", "kvm.skip.decode",
                                "vmentry"])
    assert "kvm.skip.vmcs_length" not in names
    assert e.nested


def test_without_caches_the_doorbell_write_walks_24_references():
    """SDM 28.2.3 (and Bhargava et al., ASPLOS 2008): a cold two-dimensional walk with 4-level guest tables and
    4-level EPT makes (4+1)(4+1)-1 = 24 references; with no translation caches and VPID off
    every doorbell write walks them all before the EPT misconfiguration, in order: for each
    guest level the 4 EPT references of its GPA then the guest entry, then the EPT walk of the
    final GPA. With no TLB the instruction's own fetch is such a walk too, made first: 48
    references before the exit."""
    e = explain("mmio-eventfd-len0", _opts(caches="none", vpid=False))
    names = e.event_names
    refs = [n for n in names[: names.index("exit.EPT_MISCONFIG")] if n.startswith("walk.ref.")]
    assert len(refs) == 2 * 24
    ept = [f"walk.ref.ept.{lvl}" for lvl in PAGING_LEVELS]
    expected = []
    for lvl in PAGING_LEVELS:
        expected += ept + [f"walk.ref.guest.{lvl}"]
    assert refs == 2 * (expected + ept)
    ref_rows = [s for s in e.steps if s.event and s.event.startswith("walk.ref.")]
    assert all(s.detail.startswith("HPA 0x") for s in ref_rows)


def test_port_io_has_no_walk_and_no_ept_exit():
    """kvm_fast_pio: OUT exits with reason 30 (SDM 27.2.1 Table 27-5 qualification: port in
    bits 31:16), the ioeventfd fires on KVM_PIO_BUS and the VM-exit length skips it."""
    e = explain("pio-eventfd-len1", _opts())
    names = e.event_names
    assert _subsequence(names, ["exit.IO_INSTRUCTION", "kvm.handler.io", "kvm.bus.lookup.KVM_PIO_BUS",
                                "kvm.eventfd.signal", "kvm.skip.vmcs_length", "vmentry"])
    assert not any(n.startswith("walk.") for n in names)
    ex = next(s for s in e.steps if s.event == "exit.IO_INSTRUCTION")
    assert "qual 0xe0000000" in ex.detail and "len 1" in ex.detail


def test_event_descriptions_cover_the_families():
    assert describe_event("walk.ref.ept.pde") == "walk: EPT PDE read"
    assert describe_event("psc.guest_physical.pml4e.hit") == \
        "guest-physical paging-structure cache (EPT PML4E) hit"
    assert describe_event("exit.EPT_VIOLATION") == "VM exit: EPT_VIOLATION"
    assert describe_event("kvm.bus.lookup.KVM_PIO_BUS") == "kvm_io_bus on KVM_PIO_BUS"
    assert describe_event("something.new") == "something.new"


# -- the command ----------------------------------------------------------------------------


def test_cli_json_lists_the_steps_and_their_total(capsys):
    assert main(["explain", "mmio-eventfd-len0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["route"] == "mmio-eventfd-len0" and out["profile"] == "skylake-sp"
    assert sum(s["cycles"] for s in out["steps"]) == pytest.approx(out["total_cycles"])
    assert sum(out["breakdown"].values()) == pytest.approx(out["total_cycles"])
    assert any(s["event"] == "kvm.bus.lookup.KVM_FAST_MMIO_BUS" for s in out["steps"])


def test_cli_table(capsys):
    assert main(["explain", "pio-eventfd-len1", "--vpid", "off", "--caches", "none"]) == 0
    out = capsys.readouterr().out
    for text in ("IO_INSTRUCTION", "KVM_PIO_BUS", "eventfd_signal", "total", "by component",
                 "vpid=off", "caches=none", "guest: out dx,al"):
        assert text in out, text


def test_cli_json_to_a_file(tmp_path, capsys):
    path = tmp_path / "e.json"
    assert main(["explain", "cpuid", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert any(s["event"] == "exit.CPUID" for s in data["steps"])
    assert "total" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["explain", "no-such-route"], "unknown route"),
    (["explain", "pio-user", "--variant", "no-such"], "unknown KVM variant"),
    (["explain", "pio-user", "--profile", "no-such"], "unknown profile"),
    (["explain", "pio-user", "--profile", "/nonexistent/p.toml"], "cannot read profile"),
    (["explain", "pio-user", "--caches", "no-such"], "unknown cache configuration"),
    (["explain", "mmio-eventfd-len0", "--variant", "upstream-2013"], "cannot run under"),
    (["explain", "pio-user", "--nested", "vmware"], "unknown nested setting"),
    (["explain", "pio-user", "--json", "/nonexistent/dir/x.json"], "not a directory"),
    (["explain", "pio-user", "--cpl", "1"], "invalid choice"),
    (["explain", "pio-user", "--warmup", "0"], "at least 1"),
])
def test_cli_errors_are_one_line_and_status_2(argv, message, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (fastmmio.cli._Parser: status 2)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_cli_says_which_kernel_rules_the_variant_uses(capsys):
    """explain names the variant's kernel, its ioeventfd registration rules and why they do not
    change the 2015 variants' routes."""
    assert main(["explain", "pio-eventfd-len1", "--variant", "rfc-2015"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Linux 4.2 (Aug 2015)" in out and "length 0 with DATAMATCH or with PIO EINVAL" in out
    assert "no route registers a length-0 PIO one" in out


def _walk_refs(route: str, variant: str) -> list[str]:
    e = explain(route, _opts(variant=variant))
    return [n for n in e.event_names if n.startswith("walk.ref.")]


def test_rfc_doorbell_walk_stops_at_the_pde_only_when_alone_in_its_2mib_region():
    """The RFC as posted never installs an SPTE for the doorbell page, and the EPT violation
    invalidates the cached translations of the doorbell's walk (SDM 28.3.3.1), so every
    write walks again: the 4 guest entries, then the EPT from the top (SDM 28.2.2). When the
    doorbell is alone in its 2 MiB region the EPT PDE is not present (KVM built no page table
    there) and the walk stops at it: 4 + 3 = 7 references. When RAM the guest uses shares the
    region, the PDE points to a page table and the walk reads the (not-present) PTE too:
    4 + 4 = 8."""
    guest = [f"walk.ref.guest.{lvl}" for lvl in PAGING_LEVELS]
    ept = [f"walk.ref.ept.{lvl}" for lvl in PAGING_LEVELS]
    assert _walk_refs("mmio-eventfd-len0", "rfc-2015") == guest + ept[:3]
    assert _walk_refs("mmio-eventfd-len0-ram-2m", "rfc-2015") == guest + ept


def test_upstream_doorbell_walk_does_not_depend_on_the_2mib_neighbourhood():
    """Upstream installs an MMIO SPTE (in a page table of its own), and the misconfiguration
    does not invalidate the paging-structure caches, so both layouts walk the same 2
    references (the guest PTE and the EPT PTE below the cached PDEs)."""
    for route in ("mmio-eventfd-len0", "mmio-eventfd-len0-ram-2m"):
        assert _walk_refs(route, "upstream") == ["walk.ref.guest.pte", "walk.ref.ept.pte"]
