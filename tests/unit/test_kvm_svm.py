"""KVM on SVM: the NPT SPTE format, npf_interception old and new (01cde4eaaeca), the RFC's
2/3 as 1/3's analogue, io_interception and the next-RIP skip, TLB maintenance at VMRUN, and
the guest image running on the SVM machine.

Sources: arch/x86/kvm/mmu/spte.c (``kvm_mmu_reset_all_pte_masks``), arch/x86/kvm/svm/svm.c
(``npf_interception`` with 01cde4eaaeca, ``io_interception``,
``__svm_skip_emulated_instruction``, ``svm_flush_tlb_asid``, ``svm_adjust_mmio_mask``),
AMD64 APM vol. 2 15.7.1 (next RIP), 15.8.4 (decode assists), 15.10.2 (IOIO), 15.16.1
(TLB_CONTROL), 15.25.6 (#NPF EXITINFO1).
"""

from __future__ import annotations

import json

import pytest

from fastmmio import layout
from fastmmio.bench import Checker, check_batch
from fastmmio.cli import main
from fastmmio.errors import UsageError
from fastmmio.routes import build_machine, get_route, load_catalogue
from fastmmio.sim.backend import SimBackend, SimOptions
from fastmmio.sim.kvm.memslots import KvmMemslots
from fastmmio.sim.kvm.mmu import TdpMmu, get_mmio_spte_gfn, make_mmio_spte
from fastmmio.sim.kvm.spte import SHADOW_NONPRESENT_VALUE, ept_format, npt_format
from fastmmio.sim.svm import layouts as S
from fastmmio.sim.svm.processor import READ, WRITE, Fault, SvmProcessor
from fastmmio.sim.vmx.memory import HostMemory, PageAllocator

# ------------------------------------------------------------------------------------------
# the SPTE format as data
# ------------------------------------------------------------------------------------------


def test_npt_mmio_spte_is_bit_51_present_write_user():
    """spte.c ``kvm_mmu_reset_all_pte_masks``: below MAXPHYADDR 52 the MMIO mask and value
    are BIT(51) | PT_PRESENT_MASK, access bits ACC_WRITE_MASK | ACC_USER_MASK kept by
    ``make_mmio_spte``; the generation sits in bits 10:3 and 62:52 as on EPT."""
    f = npt_format(48)
    assert f.mmio_mask == f.mmio_value == (1 << 51) | 1
    spte = make_mmio_spte(0x400, 0x3, f)
    assert spte & ((1 << 51) | 1) == (1 << 51) | 1
    assert spte & S.PT_PRESENT_MASK and spte & 0b110 == 0b110  # W and U
    assert (spte >> 3) & 0xFF == 3  # generation low bits
    assert get_mmio_spte_gfn(spte, f) == 0x400


def test_npt_at_maxphyaddr_52_has_no_mmio_caching():
    """spte.c: with ``shadow_phys_bits`` 52 there is no reserved bit to use: mask 0, and
    ``kvm_mmu_set_mmio_spte_mask`` turns MMIO caching off; a no-slot fault emulates at once
    (``kvm_handle_noslot_fault``) and installs nothing."""
    f = npt_format(52)
    assert f.mmio_value == 0
    mem = HostMemory(52)
    mmu = TdpMmu(mem, PageAllocator(mem), KvmMemslots(), spte_format=f)
    assert not mmu.mmio_caching
    r = mmu.page_fault(layout.MMIO_BASE, S.NPF_RW | S.NPF_US)
    assert r.ret.name == "EMULATE" and r.path == "noslot_no_caching"
    assert mmu.get_spte(layout.MMIO_BASE) == SHADOW_NONPRESENT_VALUE


def test_npt_sme_mmio_mask_from_svm_adjust_mmio_mask():
    """``svm_adjust_mmio_mask``: under SME the reduced width's bits phys_bits..51, past the
    C-bit."""
    f = npt_format(43, sme_c_bit=47)
    assert f.mmio_mask == (((1 << 52) - 1) & ~((1 << 43) - 1)) | 1


def test_ept_format_keeps_kvm_mmu_set_ept_masks():
    """``kvm_mmu_set_ept_masks``: MMIO value W|X under RWX|SVE, no access bits."""
    f = ept_format()
    assert (f.mmio_value, f.mmio_mask, f.mmio_access_mask) == (0b110, 0b111 | 1 << 63, 0)
    assert make_mmio_spte(5, 0, f) == 0b110 | (5 << 12)


def _npt_machine():
    mem = HostMemory(46)
    alloc = PageAllocator(mem)
    slots = KvmMemslots()
    mmu = TdpMmu(mem, alloc, slots, spte_format=npt_format(46))
    ram = alloc.alloc_pages(1)
    slots.set_user_memory_region(0, 0, 0x2000 * 0 + 0x1000, 0x1000, ram)
    proc = SvmProcessor(mem, "apm-max", maxphyaddr=46)
    proc.set_ncr3(mmu.root_hpa)
    proc.load_guest_state(cr0=0x80000001, cr3=0, cr4=0x20, efer=0x500, cpl=0)
    return mem, mmu, proc, ram


def test_npt_spte_written_by_the_mmu_is_walked_by_the_svm_processor():
    """The MMU's NPT leaf (present, user, writable, accessed/dirty) is a valid nested entry
    for the processor (APM 15.25.5: user, writable at both levels); the MMIO SPTE is a #NPF
    with P and RSV set, on the final GPA (15.25.6), which KVM reads as PFERR_RSVD_MASK."""
    mem, mmu, proc, ram = _npt_machine()
    assert mmu.page_fault(0x1000, S.NPF_RW | S.NPF_US).ret.name == "FIXED"
    spte = mmu.get_spte(0x1000)
    assert spte & 0b111 == 0b111 and not spte >> 63  # P, W, U; NX clear
    assert proc._ept_translate(0x1234, WRITE, None, True)[0] == ram | 0x234
    assert mmu.page_fault(layout.MMIO_BASE, S.NPF_RW | S.NPF_US).ret.name == "EMULATE"
    f = proc._ept_translate(layout.MMIO_BASE, READ, None, True)
    assert isinstance(f, Fault) and f.kind == "npf"
    assert f.error_code & (S.NPF_P | S.NPF_RSV | S.NPF_FINAL_GPA) == S.NPF_P | S.NPF_RSV | S.NPF_FINAL_GPA


# ------------------------------------------------------------------------------------------
# the variants, shown by explain --arch svm --json event counts
# ------------------------------------------------------------------------------------------


def _explain_json(capsys, *argv: str) -> dict:
    assert main(["explain", "--arch", "svm", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_svm_pre_70_decodes_and_emulates_the_length0_doorbell(capsys):
    """Before 01cde4eaaeca every reserved-bit #NPF goes to kvm_mmu_page_fault and the
    emulator, with the VMCB's bytes (no fetch); the length-0 ioeventfd is found on
    KVM_MMIO_BUS by vcpu_mmio_write: in the kernel, decoded and emulated."""
    ev = _explain_json(capsys, "mmio-eventfd-len0", "--variant", "svm-pre-7.0")["events"]
    assert ev["exit.NPF"] == 1 and ev["kvm.handler.npf"] == 1
    assert ev["kvm.emulate.decode"] == 1 and ev["kvm.emulate.insn_bytes"] == 1
    assert "kvm.emulate.fetch" not in ev
    assert ev["kvm.bus.lookup.KVM_MMIO_BUS"] == 1 and ev["kvm.eventfd.signal"] == 1
    assert "kvm.bus.lookup.KVM_FAST_MMIO_BUS" not in ev and "kvm.skip.next_rip" not in ev


def test_svm_skips_the_length0_doorbell_by_next_rip(capsys):
    """01cde4eaaeca: RSVD, not in guest mode, next RIP non-zero -> KVM_FAST_MMIO_BUS write,
    skip by next RIP; nothing decoded."""
    d = _explain_json(capsys, "mmio-eventfd-len0", "--variant", "svm")
    ev = d["events"]
    assert ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 1 and ev["kvm.eventfd.signal"] == 1
    assert ev["kvm.skip.next_rip"] == 1
    assert not any(k.startswith("kvm.emulate") or k.startswith("kvm.mmu") for k in ev)
    assert d["profile"] == "zen4" and "next_rip_on_npf=yes" in d["sim"]


def test_svm_without_next_rip_on_npf_falls_back_to_emulation(capsys):
    """APM 15.7.1: nRIP is reset to zero for #NPF; then 01cde4eaaeca's test fails and the
    old path (emulation) runs."""
    d = _explain_json(capsys, "mmio-eventfd-len0", "--variant", "svm", "--next-rip-on-npf", "no")
    ev = d["events"]
    assert "kvm.bus.lookup.KVM_FAST_MMIO_BUS" not in ev
    assert ev["kvm.emulate.decode"] == 1 and ev["kvm.bus.lookup.KVM_MMIO_BUS"] == 1
    assert any(s["what"] == "KVM step: fast_mmio:no_next_rip" for s in d["steps"])


def test_svm_length1_doorbell_is_emulated_even_with_the_fast_path(capsys):
    """The fast bus only holds length-0 ioeventfds: a length-1 doorbell misses it, then is
    emulated (two bus look-ups)."""
    ev = _explain_json(capsys, "mmio-eventfd-len1", "--variant", "svm")["events"]
    assert ev["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == 1 and ev["kvm.bus.lookup.KVM_MMIO_BUS"] == 1
    assert ev["kvm.emulate.decode"] == 1


def test_explain_svm_rejects_a_vmx_variant(capsys):
    assert main(["explain", "--arch", "svm", "--variant", "upstream", "empty"]) == 2
    assert "on svm" in capsys.readouterr().err


def test_sim_options_per_arch():
    assert SimOptions(arch="svm", variant="svm").caches == "apm-max"
    with pytest.raises(UsageError):
        SimOptions(arch="vmx", variant="svm")
    with pytest.raises(UsageError):
        SimOptions(arch="svm", variant="svm", caches="skylake-sp")
    with pytest.raises(UsageError):
        SimOptions(arch="svm", variant="svm", next_rip_on_npf="maybe")
    with pytest.raises(UsageError):
        SimOptions(arch="svm", variant="svm", vpid=False)
    with pytest.raises(UsageError):
        SimOptions(variant="svm", ept_ad=False)
    assert SimOptions(variant="svm-pre-7.0").arch == "svm"  # the variant's own architecture


# ------------------------------------------------------------------------------------------
# rfc-2015-svm: the checks review.py makes for rfc-2015
# ------------------------------------------------------------------------------------------


def _run(route: str, variant: str, n: int = 8, warm: int = 4, **kw):
    o = SimOptions(variant=variant, arch="svm", **kw)
    with SimBackend(o).open(build_machine(get_route(route), 0)) as s:
        if warm:
            s.run_batch(warm)
        b = s.run_batch(n)
    return s, b


def test_rfc_2015_svm_takes_reads_of_the_doorbell_for_notifications():
    """As 1/3 on VMX (objection 1): the bus write is made for every #NPF, so a read of the
    doorbell region signals and is skipped, returning no memory."""
    s, b = _run("ro-read-eventfd", "rfc-2015-svm")
    assert b.eventfd_signals["doorbell"] == 8
    value = int.from_bytes(s.read_guest(layout.MAILBOX_GPA + layout.MAILBOX_LAST_READ, 8), "little")
    assert value & 0xFF != layout.RO_PATTERN
    s2, b2 = _run("ro-read-eventfd", "svm")
    assert b2.eventfd_signals["doorbell"] == 0


def test_rfc_2015_svm_never_installs_the_doorbell_spte():
    """Objection 4: after steady-state doorbell writes the page's NPT entry is still not
    present, so every write walks both dimensions again."""
    s, b = _run("ro-write-eventfd", "rfc-2015-svm")
    assert s.vm.mmu.get_spte(layout.RO_BASE) == SHADOW_NONPRESENT_VALUE
    assert b.eventfd_signals["doorbell"] == 8 and b.events["kvm.handler.npf.prelude"] == 8
    assert sum(v for k, v in b.events.items() if k.startswith("walk.ref.")) >= 8


def test_rfc_2015_svm_costs_a_bus_lookup_on_every_ordinary_fault():
    """Objection 2: first touches of RAM (demand #NPFs) each pay a KVM_FAST_MMIO_BUS
    look-up under the RFC, none under svm."""
    _, b = _run("page-touch", "rfc-2015-svm", n=16, warm=0)
    faults = b.events["exit.NPF"]
    assert faults > 0 and b.events["kvm.bus.lookup.KVM_FAST_MMIO_BUS"] == faults
    _, b2 = _run("page-touch", "svm", n=16, warm=0)
    assert not any(k.startswith("kvm.bus.lookup") for k in b2.events)


# ------------------------------------------------------------------------------------------
# io_interception, the skip, TLB maintenance
# ------------------------------------------------------------------------------------------


def test_port_io_skips_by_next_rip():
    """io_interception: svm->next_rip = EXITINFO2; with nrips the VMCB's next RIP (15.7.1,
    15.10.2) is used: no decode."""
    _, b = _run("pio-eventfd-len1", "svm")
    assert b.events["exit.IOIO"] == 8 and b.events["kvm.skip.next_rip"] == 8
    assert "kvm.skip.decode" not in b.events


def test_rfc_2015_svm_without_next_rip_skips_by_decoding():
    """__svm_skip_emulated_instruction: no next RIP -> EMULTYPE_SKIP (fetch and decode)."""
    _, b = _run("ro-write-eventfd", "rfc-2015-svm", next_rip_on_npf="no")
    assert b.events["kvm.skip.decode"] == 8 and b.events["kvm.emulate.fetch"] >= 8


def test_mmu_reload_sets_ncr3_and_flushes_the_asid():
    """A new root goes to nCR3 (svm_load_mmu_pgd); the flush is TLB_CONTROL 03h with
    FlushByAsid (svm_flush_tlb_asid), consumed by the next VMRUN; without FlushByAsid a new
    ASID."""
    s, _ = _run("mmio-eventfd-len0", "svm", n=2, warm=0)
    vcpu, mmu = s.vcpu, s.vm.mmu
    mmu.zap_all_fast()
    vcpu._before_entry()
    assert s.processor.ncr3 == mmu.root_hpa
    assert vcpu.vmrun_controls() == (S.TLB_CONTROL_FLUSH_ASID, None)
    assert vcpu.vmrun_controls() == (S.TLB_CONTROL_DO_NOTHING, None)
    s.processor.proc.flush_by_asid = False
    mmu.requests.add("tlb_flush")
    vcpu._before_entry()
    assert vcpu.vmrun_controls() == (S.TLB_CONTROL_DO_NOTHING, s.processor.asid + 1)


# ------------------------------------------------------------------------------------------
# every route on the SVM machine, and the same guest-visible state as on VMX
# ------------------------------------------------------------------------------------------

ROUTES = [r.name for r in load_catalogue()]
# rfc-2015-svm's one expected failure: a read of the doorbell is taken for a notification
EXPECTED_FAILURES = {("rfc-2015-svm", "ro-read-eventfd")}


@pytest.mark.parametrize("variant", ["svm", "svm-pre-7.0", "rfc-2015-svm"])
def test_every_route_passes_the_bench_checks_on_svm(variant):
    failed = []
    for name in ROUTES:
        route = get_route(name)
        c = Checker()
        with SimBackend(SimOptions(variant=variant, arch="svm")).open(build_machine(route, 0)) as s:
            for i, n in enumerate((2, 4)):
                check_batch(route, s.run_batch(n), s, i + 1, c)
        if not c.ok:
            failed.append(name)
    assert {(variant, f) for f in failed} == {e for e in EXPECTED_FAILURES if e[0] == variant}


def _guest_visible(arch: str, variant: str, name: str):
    with SimBackend(SimOptions(variant=variant, arch=arch)).open(build_machine(get_route(name), 0)) as s:
        b1 = s.run_batch(3)
        b2 = s.run_batch(5)
        # RAX, RDX and R14 end up holding RDTSC results (unicorn's own clock): left out
        regs = {k: v for k, v in s.regs().items() if k not in ("rflags", "rax", "rdx", "r14")}
        mailbox = s.read_guest(layout.MAILBOX_GPA, 0x100)
        mailbox = mailbox[:layout.MAILBOX_T0] + mailbox[layout.MAILBOX_T1 + 8:]  # TSC values
    return ([(b.eventfd_signals, b.user_exits, b.exits, b.coalesced_entries) for b in (b1, b2)],
            regs, mailbox)


@pytest.mark.parametrize("name", ROUTES)
def test_vmx_and_svm_machines_agree_on_guest_visible_state(name):
    """Both simulators model the same KVM for the guest: registers, the mailbox, eventfd
    signals, exits to userspace and the coalesced ring agree route by route (upstream on VMX
    against svm on SVM: both have a fast MMIO path)."""
    assert _guest_visible("vmx", "upstream", name) == _guest_visible("svm", "svm", name)


# ------------------------------------------------------------------------------------------
# compare --arch svm, and an SVM host
# ------------------------------------------------------------------------------------------


def test_compare_arch_svm_answers_the_question_on_amd(tmp_path, capsys):
    """The SVM variants' tables and the verdict on AMD, from the run's own numbers: before
    01cde4eaaeca the length-0 doorbell is emulated (not as fast as port I/O); with it and next
    RIP it takes the fast bus; without next RIP it falls back; RFC 2/3 fails 1/3's review."""
    out = tmp_path / "out"
    status = main(["compare", "--arch", "svm", "--no-kvm", "--out", str(out),
                   "pio-eventfd-len1", "mmio-eventfd-len0"])
    text = capsys.readouterr().out
    assert status == 0
    flat = " ".join(text.split())  # the output wraps at the console's width
    assert "svm-pre-7.0: KVM on SVM before 7.0" in flat and "Verdict on AMD" in text
    data = json.loads((out / "results.json").read_text())
    v = data["svm_verdict"]
    points = {(p["scenario"], p["variant"]): p for p in v["points"]}
    assert points[("apm-max", "svm-pre-7.0")]["ratio"] > points[("apm-max", "svm")]["ratio"]
    assert points[("no-nrip", "svm")]["ratio"] == pytest.approx(points[("apm-max", "svm-pre-7.0")]["ratio"])
    assert points[("apm-max", "svm")]["entry"] == "reserved"
    assert points[("apm-max", "rfc-2015-svm")]["entry"] == "not present"
    assert all(p["profile"] == "zen4" for p in v["points"])
    assert any("Is MMIO as fast as port I/O on AMD?" in line for line in v["lines"])
    assert any("objection 1" in line and "fails" in line for line in v["lines"])
    assert any("was not recovered" in line for line in v["lines"])


@pytest.mark.parametrize("argv", [["--arch", "arm"], ["--arch", "vmx", "--variants", "svm"]])
def test_compare_arch_bad_input_is_one_line_exit_2(argv, capsys):
    try:
        status = main(["compare", "--no-kvm", *argv, "empty"])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_svm_host_is_described_as_one():
    from fastmmio.compare.run import KvmSide
    from fastmmio.result import HostInfo

    host = HostInfo("AMD EPYC 9654", 2_400_000, "7.0", "svm", False, 0, "SVM runs CPL0")
    note = KvmSide("measured", host=host).comparable()
    assert note.startswith("SVM host (AMD)") and "--arch svm" in note and "01cde4eaaeca" in note


def test_without_decode_assists_the_emulator_fetches():
    """npf_interception passes the VMCB's bytes only with DecodeAssists (``static_cpu_has(
    X86_FEATURE_DECODEASSISTS)``); without them (or with none recorded, APM 15.8.4) the
    emulator fetches the instruction through the guest's tables itself."""
    o = SimOptions(variant="svm-pre-7.0", arch="svm")
    with SimBackend(o).open(build_machine(get_route("mmio-eventfd-len0"), 0)) as s:
        s.processor.proc.decode_assists = False
        s.run_batch(2)
        b = s.run_batch(4)
    assert b.events["kvm.emulate.fetch"] == 4 and "kvm.emulate.insn_bytes" not in b.events
    assert b.eventfd_signals["doorbell"] == 4
