"""The KVM variants of the 2015 thread (the Aug 2015 RFC series and its review; 68c3b4d1), run end to end on unicorn + the
processor model + the KVM model: [PATCH RFC 1/3] "vmx: allow ioeventfd for EPT violations" as
posted and fixed, Xiao Guangrong's two alternatives, and KVM before the fast MMIO bus."""

import pytest

from fastmmio import layout
from fastmmio.errors import IoEventFdError, UsageError
from fastmmio.guest.build import build_image
from fastmmio.guest.program import Access, AccessKind
from fastmmio.machine import IoEventFdSpec, Machine, MachineSpec, MemSlot
from fastmmio.routes import build_machine, get_route
from fastmmio.sim.kvm.mmu import SHADOW_NONPRESENT_VALUE
from fastmmio.sim.kvm.variants import VARIANTS, get_variant
from fastmmio.sim.vmx.layouts import EPT_R, EPT_W
from kvm_sim_harness import MachineRun

N = 4
RO = layout.RO_BASE


def ro_machine(kind: AccessKind, width: int = 4, length: int = 0) -> Machine:
    """An access to the read-only memslot with a length-``length`` MMIO ioeventfd on it."""
    access = Access(kind, width, RO, 0x11 if kind is AccessKind.WRITE else 0)
    spec = MachineSpec(
        memslots=(MemSlot(layout.RAM_SLOT, layout.RAM_BASE, layout.RAM_SIZE),
                  MemSlot(layout.RO_SLOT, RO, layout.RO_SIZE, readonly=True, fill=layout.RO_PATTERN)),
        ioeventfds=(IoEventFdSpec("doorbell", False, RO, length),),
    )
    return Machine(build_image(access, 0), spec)


def pattern(width):
    return int.from_bytes(bytes([layout.RO_PATTERN]) * width, "little")


def test_variant_names():
    """Variants are selected by name; an unknown name is a UsageError naming the choices."""
    assert set(VARIANTS) == {"upstream-2013", "upstream", "rfc-2015", "rfc-2015-posted",
                             "rfc-2015-fixed", "bad-page",
                             "reserved-write-mostly"}
    with pytest.raises(UsageError, match="rfc-2015-fixed"):
        get_variant("rfc-2016")


def test_upstream_2013_has_no_fast_bus_and_no_length0():
    """Before 68c3b4d1/f848a5a8: length-0 ioeventfds are EINVAL and every EPT
    misconfiguration goes to kvm_mmu_page_fault and the emulator."""
    with pytest.raises(IoEventFdError) as e:
        MachineRun(build_machine(get_route("mmio-eventfd-len0"), 0), variant="upstream-2013")
    assert e.value.errno_name == "EINVAL"
    run = MachineRun(build_machine(get_route("mmio-eventfd-len4"), 0), variant="upstream-2013", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N
    assert run.ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 0
    assert run.ev["kvm.emulate"] == N and run.exits_by_reason()["EPT_MISCONFIG"] == N - 1


def test_rfc_2015_never_installs_an_spte_and_looks_up_every_violation():
    """RFC 1/3 as posted: the write is caught at the top of handle_ept_violation, skipped, and
    no SPTE is ever installed for the page (objection 4); every EPT violation, demand faults
    included, pays a KVM_FAST_MMIO_BUS look-up (objection 2)."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="rfc-2015", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N and run.ev["kvm.emulate"] == 0
    assert run.vm.mmu.get_spte(RO) == SHADOW_NONPRESENT_VALUE
    assert run.ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == run.exits_by_reason()["EPT_VIOLATION"]
    assert not run.user_exits


def test_rfc_2015_read_signals_and_skips_the_load():
    """Objection 1: the bus write happens for reads too: the eventfd fires and the load is
    skipped (the guest's register keeps its old value, 0); upstream reads the memory."""
    bad = MachineRun(ro_machine(AccessKind.READ), variant="rfc-2015", n=N)
    assert bad.vm.eventfd_counts()["doorbell"] == N
    assert bad.mailbox(layout.MAILBOX_LAST_READ) == 0
    good = MachineRun(ro_machine(AccessKind.READ), variant="upstream", n=N)
    assert good.vm.eventfd_counts()["doorbell"] == 0
    assert good.mailbox(layout.MAILBOX_LAST_READ) == pattern(4)


def test_rfc_2015_fixed_maps_readonly_and_reads_are_reads():
    """The fixed RFC: writes only, and the page mapped read-only first. A read then leaves a
    guest-physical translation cached (SDM 28.3.2: created from a present entry), but each
    write's EPT violation invalidates the mappings for its GPA (28.3.3.1), so after a write
    nothing is cached for the page. Reads return memory and signal nothing."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="rfc-2015-fixed", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N and run.ev["kvm.emulate"] == 0
    spte = run.vm.mmu.get_spte(RO)
    assert spte & EPT_R and not spte & EPT_W
    assert not run.proc.has_gpa_translation(RO)
    rd = MachineRun(ro_machine(AccessKind.READ), variant="rfc-2015-fixed", n=N)
    assert rd.vm.eventfd_counts()["doorbell"] == 0
    assert rd.mailbox(layout.MAILBOX_LAST_READ) == pattern(4)
    assert rd.proc.has_gpa_translation(RO)


def test_rfc_2015_fixed_writes_still_exit_on_every_access():
    """Objection 5: a present read-only entry caches read permission only; each write is
    still an EPT violation (from the cached translation, SDM 28.3.3.4, without a re-walk)."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="rfc-2015-fixed", n=N)
    up = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="upstream", n=N)
    assert run.exits_by_reason()["EPT_VIOLATION"] == up.exits_by_reason()["EPT_VIOLATION"]


def test_bad_page_variant_takes_write_after_fast_page_fault():
    """Bus write in the read-only-write (bad page) path: no emulation, no SPTE installed by
    the write; the fault went through the slow path each time (kvm.mmu.bad_page)."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="bad-page", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N and run.ev["kvm.emulate"] == 0
    assert run.ev["kvm.mmu.bad_page"] == N and run.ev["kvm.mmu.slow_path"] >= N
    rd = MachineRun(ro_machine(AccessKind.READ), variant="bad-page", n=N)
    assert rd.vm.eventfd_counts()["doorbell"] == 0
    assert rd.mailbox(layout.MAILBOX_LAST_READ) == pattern(4)


def test_reserved_write_mostly_turns_writes_into_misconfig_fast_path():
    """Write-mostly read-only page with a reserved (MMIO-style) SPTE: after the first fault
    every write is an EPT misconfiguration answered by KVM_FAST_MMIO_BUS."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="reserved-write-mostly", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N
    assert run.exits_by_reason()["EPT_MISCONFIG"] == N - 1 and run.ev["kvm.emulate"] == 1
    assert run.vm.mmu.is_mmio_spte(run.vm.mmu.get_spte(RO))


def test_reserved_write_mostly_read_of_doorbell_signals():
    """The same read hazard as the RFC: handle_ept_misconfig does not know the access type,
    so a read of the doorbell address hits the fast bus (signal + skip)."""
    run = MachineRun(ro_machine(AccessKind.READ), variant="reserved-write-mostly", n=N)
    assert run.vm.eventfd_counts()["doorbell"] == N - 1
    assert run.ev["kvm.emulate"] == 1  # only the first load (the fault that made the SPTE) ran


def test_rfc_skip_needs_the_instruction_length():
    """The RFC as posted (rfc-2015-posted): skip_emulated_instruction on an EPT violation uses
    VM_EXIT_INSTRUCTION_LEN even when KVM runs nested; a processor that leaves it undefined
    (SDM 27.2.4) makes the skip impossible: internal error. Upstream's misconfiguration path
    decodes instead (d391f1207067), and so does rfc-2015 with the merged rule (every exit
    whose length SDM 27.2.4 leaves undefined)."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="rfc-2015-posted", n=N,
                     nested=True, fill_instruction_length=False)
    assert run.stop.kind == "handler" and run.vcpu.last_exit.kind == "internal-error"
    assert run.vm.eventfd_counts()["doorbell"] == 1
    merged = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="rfc-2015", n=N, nested=True,
                        fill_instruction_length=False)
    assert merged.vm.eventfd_counts()["doorbell"] == N and merged.ev["kvm.skip.decode"] == N
    up = MachineRun(build_machine(get_route("mmio-eventfd-len0"), 0), n=N, nested=True,
                    fill_instruction_length=False)
    assert up.vm.eventfd_counts()["doorbell"] == N and up.ev["kvm.skip.decode"] == N - 1


# -- the emulator's operand address: the faulting-GPA shortcut is a property of the variant --

def _emulated_walks(variant: str) -> tuple[int, int]:
    """(software walks, entry reads) per emulated doorbell write of mmio-eventfd-len4."""
    run = MachineRun(build_machine(get_route("mmio-eventfd-len4"), 0), variant=variant, n=N)
    emulated = run.ev["kvm.emulate"]
    assert emulated >= N - 1
    return run.ev["kvm.emulate.walk"] / emulated, run.ev["kvm.emulate.walk.ref"] / emulated


@pytest.mark.parametrize("name,shortcut", [
    ("upstream", True), ("upstream-2013", False), ("rfc-2015", False),
    ("rfc-2015-fixed", False), ("bad-page", False), ("reserved-write-mostly", False)])
def test_only_todays_kvm_has_the_faulting_gpa_shortcut(name, shortcut):
    """``vcpu->arch.gpa_available`` came with "kvm: svm: Use the hardware provided GPA instead
    of page walk" (Tom Lendacky, first posted 22 Aug 2016, SEV RFC patch 03/28): after the
    2015 thread (Linux 4.2) and long after 2013. Only today's KVM uses it."""
    assert get_variant(name).emulator_gpa_available is shortcut


def test_2013_emulator_walks_the_guest_tables_for_the_operand():
    """KVM of 2013 (emulator_read_write_onepage -> vcpu_mmio_gva_to_gpa; the MMIO gva cache
    holds gva 0 under TDP, handle_mmio_page_fault's ``if (direct) addr = 0``, so it never
    matches): every emulated MMIO write walks the guest's 4-level tables twice, once for the
    instruction fetch and once for the operand, 4 entry reads each."""
    assert _emulated_walks("upstream-2013") == (2, 8)


def test_todays_emulator_uses_the_faulting_gpa_for_the_operand():
    """Today (EMULTYPE_PF, ctxt->gpa_available): the operand's GPA is the EPT exit's, so the
    only software walk is the instruction fetch's (4 entry reads)."""
    assert _emulated_walks("upstream") == (1, 4)


@pytest.mark.parametrize("variant", ["rfc-2015", "rfc-2015-fixed"])
def test_rfc_early_return_is_charged_the_prelude_not_the_whole_handler(variant):
    """RFC 1/3 (Aug 2015) writes the fast bus right after handle_ept_violation reads the GPA and
    returns on a hit, before the error code and kvm_mmu_page_fault: each hit counts
    kvm.handler.ept_violation.prelude and not kvm.handler.ept_violation; every other EPT
    violation (demand faults of the code, stack and mailbox pages; the fixed RFC's read fault
    that maps the page) counts the whole handler once and no prelude."""
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant=variant, n=N)
    hits = run.vm.eventfd_counts()["doorbell"]
    assert hits == N
    violations = run.exits_by_reason()["EPT_VIOLATION"]
    assert run.ev["kvm.handler.ept_violation.prelude"] == hits
    assert run.ev["kvm.handler.ept_violation"] == violations - hits
    assert run.ev["kvm.handler.ept_violation"] == run.ev["kvm.mmu.page_fault"]


def test_upstream_never_charges_the_prelude():
    run = MachineRun(ro_machine(AccessKind.WRITE, 1), variant="upstream", n=N)
    assert run.ev["kvm.handler.ept_violation.prelude"] == 0
    assert run.ev["kvm.handler.ept_violation"] == run.exits_by_reason()["EPT_VIOLATION"]


@pytest.mark.parametrize("profile", ["skylake-sp", "pci-testdev-2013"])
def test_the_prelude_has_its_own_price_basis_and_source(profile):
    """The prelude is priced by its own key (not by kvm.handler.ept_violation's fallback), with
    a basis and a source in both bundled profiles."""
    from fastmmio.costs import load_profile
    from fastmmio.costs.model import CostModel

    prof = load_profile(profile)
    price = prof.prices["kvm.handler.ept_violation.prelude"]
    assert price.basis and price.source and price.component == "handler"
    assert price.cycles < prof.prices["kvm.handler.ept_violation"].cycles
    r = CostModel(prof).resolve("kvm.handler.ept_violation.prelude")
    assert r.key == "kvm.handler.ept_violation.prelude" and r.unit_cycles == price.cycles


# -- ioeventfd registration: the rules of the kernel each variant was written against -------

@pytest.mark.parametrize("name,mmio0,pio0", [
    ("upstream-2013", "EINVAL", "EINVAL"),  # before f848a5a8: lengths 1, 2, 4, 8 only
    ("rfc-2015", None, "EINVAL"),  # Linux 4.2: !len && flags & (PIO | DATAMATCH) is EINVAL
    ("rfc-2015-fixed", None, "EINVAL"),
    ("bad-page", None, "EINVAL"),
    ("reserved-write-mostly", None, "EINVAL"),
    ("upstream", None, None),  # Linux 4.4 onward: length-0 PIO on KVM_PIO_BUS only
])
def test_length_0_registration_follows_the_variants_kernel(name, mmio0, pio0):
    """virt/kvm/eventfd.c ``kvm_assign_ioeventfd``: in Linux 3.16 to 4.3 (so in 4.2, which the
    2015 thread patched) length 0 was refused together with PIO as with DATAMATCH, and a
    length-0 MMIO ioeventfd went on KVM_MMIO_BUS and KVM_FAST_MMIO_BUS; Linux 4.4 accepted a
    length-0 PIO one (KVM_PIO_BUS only); KVM of 2013 knew no length 0."""
    from fastmmio.sim.kvm.eventfd import EventFd
    from fastmmio.sim.kvm.iobus import KvmBus
    from fastmmio.sim.kvm.vm import KvmVm

    for pio, expected in ((False, mmio0), (True, pio0)):
        vm = KvmVm(variant=name)
        addr = 0x510 if pio else 0xFE00_0000
        if expected is None:
            vm.ioeventfds.assign(EventFd(), addr, 0, pio=pio)
            assert vm.buses.write(KvmBus.KVM_PIO_BUS if pio else KvmBus.KVM_FAST_MMIO_BUS,
                                  addr, 1 if pio else 0, 0)
            assert vm.buses.write(KvmBus.KVM_FAST_MMIO_BUS, addr, 0, None) is (not pio)
        else:
            with pytest.raises(IoEventFdError) as e:
                vm.ioeventfds.assign(EventFd(), addr, 0, pio=pio)
            assert e.value.errno_name == expected


def test_no_catalogue_route_registers_a_length_0_pio_ioeventfd():
    """Why the 2015 variants' older rules change no route's result (their docstring and
    ``explain`` say so): the only rule they do not share with today's is length-0 PIO."""
    from fastmmio.routes import load_catalogue

    for route in load_catalogue():
        m = build_machine(route, 0)
        assert not any(s.pio and s.length == 0 for s in m.spec.ioeventfds), route.name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_says_which_kernel_and_rules_it_models(name):
    text = get_variant(name).rules()
    assert name in text and "ioeventfd rules" in text and "emulator operand address" in text
