"""The 2015 thread's review as computed checks (fastmmio.review): each objection of Xiao
Guangrong's reply to "[PATCH RFC 1/3] vmx: allow ioeventfd for EPT violations" fails on the
RFC as posted and holds where the thread said it would."""

from __future__ import annotations

import pytest

from fastmmio.review import STEADY_N, review_checks
from fastmmio.sim.backend import SimOptions


def _by_name(variant: str, **kw):
    return {c.name: c for c in review_checks(SimOptions(variant=variant, **kw))}


@pytest.fixture(scope="module")
def rfc():
    return _by_name("rfc-2015")


@pytest.fixture(scope="module")
def upstream():
    return _by_name("upstream")


def test_objection_1_rfc_reads_of_the_doorbell_are_skipped_and_signal(rfc):
    """Objection 1: "You always do bus_write even if it is a read access" — the RFC's
    handle_ept_violation prelude signals on a read and skips the load."""
    c = rfc["read-not-skipped"]
    assert c.passed is False
    assert c.numbers["signals_per_read"] == 1 and c.numbers["value_read"] != 0x5A


def test_objection_2_rfc_demand_faults_pay_a_bus_lookup(rfc, upstream):
    """Objection 2: "The workload of _bus_write is added for all kinds of page fault"."""
    assert rfc["demand-faults-no-bus-lookup"].passed is False
    assert rfc["demand-faults-no-bus-lookup"].numbers["bus_lookups_per_fault"] == 1
    assert upstream["demand-faults-no-bus-lookup"].passed is True


def test_objection_4_rfc_doorbell_ept_entry_never_present(rfc):
    """Objection 4: "your logic completely bypasses page-table-installation, the page table
    entry is nonpresent forever for eventfd memory" (SDM 28.3.2: nothing cached from it)."""
    c = rfc["doorbell-spte-present"]
    assert c.passed is False and c.numbers["spte_rwx"] == 0


def test_objection_5_read_only_translation_does_not_help_writes():
    """Objection 5: "even if the EPT entry is cache, it is only a readonly permission in TLB
    entry, this is useless to speed up write access" — rfc-2015-fixed installs the read-only
    SPTE, yet every write still walks (the violation invalidates what it used, 28.3.3.4)."""
    fixed = _by_name("rfc-2015-fixed")
    assert fixed["doorbell-spte-present"].passed is True
    assert fixed["read-not-skipped"].passed is True
    assert fixed["write-translation-cached"].passed is False
    assert fixed["write-translation-cached"].numbers["walk_refs_per_write"] > 0


def test_every_variant_still_signals_once_per_write(rfc, upstream):
    for checks in (rfc, upstream, _by_name("bad-page"), _by_name("reserved-write-mostly")):
        assert checks["writes-signal-once"].passed is True


def test_reserved_write_mostly_gives_a_misconfigured_spte_and_catches_reads():
    """The second alternative marks the page reserved: an MMIO SPTE (misconfiguration), from
    which nothing is cached (28.2.3.1), and a read of the doorbell hits the fast bus too."""
    rwm = _by_name("reserved-write-mostly")
    assert rwm["doorbell-spte-present"].passed is False
    assert "misconfigured" in rwm["doorbell-spte-present"].detail
    assert rwm["read-not-skipped"].passed is False


def test_checks_that_need_length_0_are_not_applicable_before_the_fast_bus():
    """upstream-2013 predates KVM_CAP_IOEVENTFD_NO_LENGTH (f848a5a8): length 0 is EINVAL."""
    old = _by_name("upstream-2013")
    assert old["read-not-skipped"].passed is None
    assert old["demand-faults-no-bus-lookup"].passed is True


def test_with_no_translation_caches_each_write_walks_in_two_dimensions():
    """With nothing cached (configuration ``none``) every access is a two-dimensional walk
    (SDM 28.2.2: up to (4+1)(4+1)-1 = 24 references), instruction fetches included. Per RFC
    doorbell write: the fetches of the store, DEC and JNZ, 3 x 24; the store itself, 23,
    because under the RFC no SPTE is ever installed for the doorbell, so KVM never allocated
    the EPT page table below the doorbell's EPT PDE and the final EPT walk stops at that
    not-present PDE (3 EPT references instead of 4). The timed region also holds the batch's
    own 7 instructions between the RDTSCs (SHL, OR, MOV, MOV, TEST, JE before the loop, the
    second RDTSC after it), 7 x 24 references spread over the STEADY_N writes."""
    full = _by_name("rfc-2015", caches="none")["write-translation-cached"]
    assert full.numbers["walk_refs_per_write"] == 3 * 24 + 23 + 7 * 24 / STEADY_N
    maxc = _by_name("rfc-2015", caches="sdm-max")["write-translation-cached"]
    assert 0 < maxc.numbers["walk_refs_per_write"] < 24
