"""The differential fuzzer's pure parts, on every host (no /dev/kvm):

* :func:`fastmmio.fuzz.differential.compare` on synthetic observations: each compared field,
  planted as the only difference, is reported under its own name; the documented exclusions
  (RFLAGS.IOPL under PVM, the exit order when a side did not keep every exit) are the only
  things it lets through.
* The saved regressions whose outcome depends on ``kvm.mmio_caching`` (skipped by
  ``tests/kvm/test_fuzz_differential.py`` on a host with caching off, such as PVM) replay their
  simulator side here: the model with caching on against the outcome stored with the
  regression (``expected_sim_mmio_caching_on``, worked out from the VMX paths in
  ``expected_sim_why``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fastmmio import layout
from fastmmio.fuzz.differential import (
    EXPECTED_FIELDS,
    MEMORY_AREAS,
    REGS,
    SIM_CACHING_ON_EXPECTED,
    Observation,
    compare,
    differs_from_expected,
    fast_bus_only,
    load_regression,
    run_sim_caching_on,
)

REGRESSIONS = Path(__file__).parents[1] / "kvm" / "regressions"
REGRESSION_FILES = sorted(REGRESSIONS.glob("*.json"))


def observation(backend: str = "kvm") -> Observation:
    """A complete synthetic observation: every register, every memory area, two exits, two
    ioeventfds, one coalesced entry."""
    exits = [("mmio", layout.MMIO_BASE, 4, True, 0x1234, 1), ("io", 0x61, 1, False, 0x5A, 1)]
    hist = {e[:5]: 1 for e in exits}
    memory = {name: bytes(range(256)) * (size // 256) + bytes(size % 256)
              for name, (_, size) in MEMORY_AREAS.items()}
    memory["ram"] = bytes(layout.RAM_SIZE)
    return Observation(backend, regs={r: 0x1000 + i for i, r in enumerate(REGS)} | {"rflags": 0x3002},
                       memory=memory, exits=list(exits), histogram=hist,
                       eventfds={"mmio-0": 1, "pio-1": 0}, user_exits=2, coalesced=1)


def plant(obs: Observation, field: str) -> tuple[Observation, str]:
    """``obs`` with ``field`` alone changed, and the name compare() must report."""
    o = dataclasses.replace(obs, regs=dict(obs.regs), memory=dict(obs.memory),
                            exits=list(obs.exits), histogram=dict(obs.histogram),
                            eventfds=dict(obs.eventfds))
    if field.startswith("regs."):
        o.regs[field[5:]] ^= 1
    elif field in ("memory.data", "memory.ro", "memory.mailbox"):
        mem = bytearray(o.memory[field[7:]])
        mem[len(mem) - 1] ^= 0xFF
        o.memory[field[7:]] = bytes(mem)
    elif field == "memory.ram":
        mem = bytearray(o.memory["ram"])
        mem[0x3000] ^= 0xFF  # outside the data area and the mailbox
        o.memory["ram"] = bytes(mem)
    elif field == "exits":
        o.exits.reverse()  # same histogram, other order
    elif field == "histogram":
        o.histogram[next(iter(o.histogram))] += 1
    elif field.startswith("eventfd."):
        o.eventfds[field[8:]] += 1
    elif field == "user_exits":
        o.user_exits += 1
    elif field == "coalesced":
        o.coalesced += 1
    elif field == "outcome":
        o.outcome = "error:shutdown"
    else:
        raise AssertionError(field)
    return o, field


FIELDS = ([f"regs.{r}" for r in REGS] + [f"memory.{m}" for m in (*MEMORY_AREAS, "ram")]
          + ["exits", "histogram", "eventfd.mmio-0", "eventfd.pio-1", "user_exits", "coalesced",
             "outcome"])


def test_identical_observations_agree():
    assert compare(observation(), observation("sim"), "vmx") == []


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kvm_kind", ["vmx", "pvm"])
def test_compare_names_each_planted_difference(field, kvm_kind):
    """compare() reports a difference in ``field`` under that name and nothing else, from
    either side."""
    kvm = observation()
    sim, want = plant(observation("sim"), field)
    assert [d.where for d in compare(kvm, sim, kvm_kind)] == [want]
    assert [d.where for d in compare(sim, kvm, kvm_kind)] == [want]


def test_compare_sees_an_eventfd_only_one_side_has():
    kvm, sim = observation(), observation("sim")
    sim.eventfds["mmio-9"] = 0
    assert [(d.where, d.kvm, d.sim) for d in compare(kvm, sim)] == [("eventfd.mmio-9", "None", "0")]


def test_compare_leaves_out_only_iopl_under_pvm():
    """RFLAGS.IOPL (bits 13:12) is excluded under PVM only; every other RFLAGS bit counts."""
    kvm, sim = observation(), observation("sim")
    sim.regs["rflags"] ^= 0x3000
    assert compare(kvm, sim, "pvm") == []
    assert [d.where for d in compare(kvm, sim, "vmx")] == ["regs.rflags"]
    sim.regs["rflags"] ^= 1 << 11  # OF
    assert [d.where for d in compare(kvm, sim, "pvm")] == ["regs.rflags"]


def test_compare_skips_the_exit_order_only_when_a_side_kept_a_sample():
    """The in-order exit list is compared only when both sides kept every exit; the histogram
    still catches a different set."""
    kvm = observation()
    sim, _ = plant(observation("sim"), "exits")
    sim.exits_complete = False
    assert compare(kvm, sim) == []
    sim.histogram[next(iter(sim.histogram))] += 1
    assert [d.where for d in compare(kvm, sim)] == ["histogram"]


# -- the regressions' simulator side, with kvm.mmio_caching on ---------------------------------


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


CACHING_DEPENDENT = [p for p in REGRESSION_FILES if fast_bus_only(load_regression(p)) is not None]


def test_caching_dependent_regressions_store_an_expected_simulator_outcome():
    """Every regression that a host with kvm.mmio_caching off skips in the caching-on replay
    carries the simulator's expected outcome with caching on, and says why."""
    assert len(CACHING_DEPENDENT) >= 3
    for path in CACHING_DEPENDENT:
        doc = _doc(path)
        assert doc.get(SIM_CACHING_ON_EXPECTED), f"{path.name}: no {SIM_CACHING_ON_EXPECTED}"
        assert set(doc[SIM_CACHING_ON_EXPECTED]) <= set(EXPECTED_FIELDS)
        assert doc.get("expected_sim_why"), f"{path.name}: say why the outcome is expected"


@pytest.mark.parametrize("path", CACHING_DEPENDENT, ids=[p.stem for p in CACHING_DEPENDENT])
def test_regression_simulator_side_with_mmio_caching(path):
    """The KVM model with kvm.mmio_caching on (MMIO SPTEs, EPT misconfigurations,
    KVM_FAST_MMIO_BUS) gives the stored outcome."""
    obs = run_sim_caching_on(load_regression(path))
    assert differs_from_expected(obs, _doc(path)[SIM_CACHING_ON_EXPECTED]) == []


def test_differs_from_expected_sees_each_field():
    obs = observation("sim")
    exact = {"outcome": obs.outcome, "regs": {"rax": obs.regs["rax"]},
             "exits": [list(e) for e in obs.exits], "user_exits": obs.user_exits,
             "eventfds": dict(obs.eventfds), "coalesced": obs.coalesced}
    assert set(exact) == set(EXPECTED_FIELDS)
    assert differs_from_expected(obs, exact) == []
    for name in exact:
        wrong = dict(exact)
        wrong[name] = {"rax": 0} if name == "regs" else ([] if name == "exits" else
                                                        {} if name == "eventfds" else 99)
        assert [d.split(":")[0] for d in differs_from_expected(obs, wrong)] == [name]
