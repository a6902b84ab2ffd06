"""What the verdict simulates: the thread's variants, the doorbell each offers, and the machine
settings (scenarios) each doorbell is compared with the port-I/O ioeventfd under.

Nothing here simulates or prices: :func:`required` lists the (route, options, scenario) triples
a compare run must simulate, and :mod:`.judge` collects the cells once from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from fastmmio.compare.core import PIO_REFERENCE, Comparison, sim_options
from fastmmio.sim.backend import SimOptions
from fastmmio.sim.kvm.variants import VARIANTS

LABELS = {
    "upstream-2013": "upstream 2013, no fast MMIO bus",
    "upstream": "upstream fast MMIO",
    "rfc-2015": "RFC as posted",
    "rfc-2015-posted": "RFC as posted, length skip when nested",
    "rfc-2015-fixed": "RFC as the review asked",
    "bad-page": "bad-page, review alternative 1",
    "reserved-write-mostly": "reserved write-mostly SPTE, review alternative 2",
}


def label(variant: str) -> str:
    return LABELS.get(variant, variant)


def skip_rule(variant: str) -> str:
    """How the variant skips the doorbell's instruction when KVM runs nested: the rule each
    row of the nested column is priced with (:meth:`Variant.decodes_when_nested`)."""
    cls = VARIANTS[variant]
    if not cls.fast_mmio_on_misconfig and not cls.ioeventfd_pf_cap:
        return "no skip: the emulator completes the write"
    if cls.nested_skip_rule == "merged":
        return "skip by decoding where SDM 27.2.4 leaves the length undefined (merged rule)"
    if cls.ioeventfd_pf_cap:
        return "skip by the VM-exit instruction length on EPT violations (as posted)"
    return "skip by decoding EPT misconfigurations (d391f1207067)"


@dataclass(frozen=True)
class Scenario:
    """A machine setting the verdict is computed under."""

    key: str
    label: str
    caches: str
    vpid: bool = True
    nested: str = "off"  # or the L0 model (fastmmio.sim.nested.L0_MODELS)

    def options(self, variant: str) -> SimOptions:
        return sim_options(variant, self.caches, self.vpid, self.nested)


SCENARIOS = (
    Scenario("sdm-max", "SDM maximum caching, VPID on, bare metal", "sdm-max"),
    Scenario("skylake-sp", "Skylake-SP-sized caches, VPID on, bare metal", "skylake-sp"),
    Scenario("none", "no translation caching, VPID on, bare metal", "none"),
    Scenario("vpid-off", "SDM maximum caching, VPID off, bare metal", "sdm-max", vpid=False),
    # Hyper-V as L0: the L0 the nested prices were derived from, and one that leaves the
    # VM-exit instruction length undefined on EPT exits (SDM 27.2.4)
    Scenario("nested", "SDM maximum caching, VPID on, KVM nested under L0 hyperv (VM-exit "
             "instruction length undefined on EPT exits, SDM 27.2.4)", "sdm-max",
             nested="hyperv"),
)
BASE = SCENARIOS[0]


def doorbell_route(variant: str) -> str:
    """The MMIO doorbell a variant offers (from the variant's capabilities): an ioeventfd
    over a read-only memslot for the RFC-style variants (``KVM_CAP_IOEVENTFD_PF``), the
    length-0 ioeventfd of ``KVM_FAST_MMIO_BUS`` upstream, and the length-1 wildcard of 2013
    (no ``KVM_CAP_IOEVENTFD_NO_LENGTH`` yet)."""
    cls = VARIANTS[variant]
    if cls.ioeventfd_pf_cap:
        return "ro-write-eventfd"
    if cls.ioeventfd_no_length:
        return "mmio-eventfd-len0"
    return "mmio-eventfd-len1"


@dataclass(frozen=True)
class Subject:
    """One row of the verdict: a variant's doorbell (or the PIO reference)."""

    key: str
    label: str
    variant: str
    route: str

    @property
    def is_pio(self) -> bool:
        return self.key == "pio"


def subjects(variants: Iterable[str]) -> list[Subject]:
    """One subject per variant (its doorbell), then the PIO reference."""
    variants = list(variants)
    out = [Subject(v, label(v), v, doorbell_route(v)) for v in variants]
    pio_variant = "upstream" if "upstream" in variants else variants[0]
    out.append(Subject("pio", "PIO ioeventfd", pio_variant, PIO_REFERENCE))
    return out


def scenarios_for(comparison: Comparison) -> tuple[Scenario, ...]:
    """Every scenario, less nested when the profile cannot price KVM as a guest."""
    return tuple(s for s in SCENARIOS if s.nested == "off" or comparison.can_price_nested())


def required(variants: Iterable[str], comparison: Comparison
             ) -> list[tuple[str, SimOptions, str]]:
    """The simulations the verdict needs: (route, options, scenario key); each subject's
    doorbell and the PIO reference under the same options."""
    out = []
    for sc in scenarios_for(comparison):
        for s in subjects(variants):
            out.append((s.route, sc.options(s.variant), sc.key))
            out.append((PIO_REFERENCE, sc.options(s.variant), sc.key))
    return out
