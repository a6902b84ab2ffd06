"""The cost model: prices event counts with a CPU profile and says what the cycles are made of.

The models (sim/vmx, sim/kvm, sim/cpu) only count events (names in
:mod:`fastmmio.sim.events`); a :class:`CostModel` turns a count vector into cycles with a
:class:`~fastmmio.costs.profile.Profile` and splits them by component (exit, walk, handler, bus,
eventfd, emulation, skip, userspace, guest: :data:`~fastmmio.costs.profile.COMPONENTS`).

Rules:

* each event name is priced by the most specific profile key that matches it (the name itself,
  or a dotted prefix of it; see :mod:`fastmmio.costs.profile`);
* an event whose most specific key is under ``[free]`` costs nothing and is listed as such;
* an event no key matches raises :class:`UnpricedEventError` naming it (never a silent 0);
* ``total == sum(breakdown.values())`` exactly, for the batch and per notification: the total is
  *defined* as that sum, in :data:`COMPONENTS` order, and the breakdown always has every
  component.

Usage::

    model = CostModel("skylake-sp")                  # or a Profile, or a path to a .toml
    p = model.price(events, iterations=1000)         # events: name -> count for the batch
    p.cycles, p.breakdown                            # per notification
    CostModel("skylake-sp", nested=True).price(...)  # KVM running as a guest
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from fastmmio.costs.profile import COMPONENTS, Free, Price, Profile, load_profile
from fastmmio.errors import ProfileError, UsageError


class UnpricedEventError(ProfileError):
    """A model reported an event the profile neither prices nor lists as free."""

    def __init__(self, event: str, profile: Profile):
        self.event = event
        self.profile_name = profile.name
        parts = event.split(".")
        tried = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        super().__init__(
            f"profile {profile.name} ({profile.origin}) has no price for event {event!r} "
            f"(looked for: {', '.join(tried)}); add a [price.\"{event}\"] table, or a "
            f"[free.\"{event}\"] table saying why it costs nothing"
        )


@dataclass(frozen=True)
class Resolution:
    """How one event name is priced."""

    event: str
    key: str  # the profile key that matched
    free: bool
    unit_cycles: float  # 0 when free; nested scaling/override already applied
    component: str | None  # None when free
    basis: str  # measured | derived | estimate | fitted | free
    source: str  # citation, or the [free] reason
    nested_rule: str = ""  # "", "override" or "scale x<factor>"
    factor: float = 1.0  # unit_cycles = factor x the price's cycles (the nested scale)

    @property
    def price_id(self) -> str | None:
        """The price this event is charged to: its key, or ``nested:<key>`` for a
        ``[nested.price]`` override (see :meth:`Profile.price_entry`); None when free."""
        if self.free:
            return None
        return f"nested:{self.key}" if self.nested_rule == "override" else self.key


@dataclass(frozen=True)
class LineItem:
    """One event's contribution to a pricing."""

    event: str
    count: float  # over the whole batch
    key: str
    component: str | None
    unit_cycles: float
    cycles: float  # count * unit_cycles, whole batch
    basis: str
    source: str
    nested_rule: str = ""

    @property
    def free(self) -> bool:
        return self.component is None


@dataclass(frozen=True)
class Pricing:
    """The price of a batch of ``iterations`` notifications.

    ``cycles`` and ``breakdown`` are per notification; ``total_cycles`` and ``total_breakdown``
    are for the whole batch. In both cases the total is the sum of the breakdown (same order).
    """

    profile: str
    nested: bool
    iterations: int
    cycles: float
    breakdown: dict[str, float]
    total_cycles: float
    total_breakdown: dict[str, float]
    items: tuple[LineItem, ...]
    sources: dict[str, str] = field(default_factory=dict)  # profile key -> citation (priced)

    def free_events(self) -> list[str]:
        """Events that were counted but priced at nothing (listed as free in the profile)."""
        return [i.event for i in self.items if i.free]

    def to_json(self) -> dict:
        return {
            "profile": self.profile,
            "nested": self.nested,
            "iterations": self.iterations,
            "cycles": self.cycles,
            "breakdown": dict(self.breakdown),
            "items": [
                {"event": i.event, "count": i.count, "key": i.key, "component": i.component,
                 "unit_cycles": i.unit_cycles, "cycles": i.cycles, "basis": i.basis,
                 "nested_rule": i.nested_rule}
                for i in self.items
            ],
            "sources": dict(self.sources),
        }


def _matches(key: str, event: str, exact: bool) -> bool:
    if event == key:
        return True
    return not exact and event.startswith(key + ".")


def _best(table: Mapping[str, Price | Free], event: str) -> Price | Free | None:
    """The longest key of ``table`` matching ``event`` (exact name or dotted prefix)."""
    parts = event.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        entry = table.get(key)
        if entry is not None and _matches(key, event, entry.exact):
            return entry
    return None


class CostModel:
    """Prices event counts with a profile.

    ``profile`` is a :class:`Profile`, a bundled profile name or a path to a TOML file.
    ``nested`` (default: the profile's ``[profile].nested``) prices KVM running as a guest:
    ``[nested.price]`` overrides and ``[nested].scale`` factors (see
    :mod:`fastmmio.costs.profile`); a profile without ``[nested]`` refuses it.
    """

    def __init__(self, profile: Profile | str | Path, *, nested: bool | None = None):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.nested = self.profile.nested_default if nested is None else bool(nested)
        if self.nested and self.profile.nested is None:
            raise ProfileError(f"profile {self.profile.name} ({self.profile.origin}) has no "
                               "[nested] table: it cannot price KVM running as a guest")
        self._resolve = lru_cache(maxsize=4096)(self._resolve_uncached)

    @property
    def name(self) -> str:
        return self.profile.name + (" (nested)" if self.nested else "")

    def resolve(self, event: str) -> Resolution:
        """How ``event`` is priced; :class:`UnpricedEventError` if the profile does not know it."""
        if not isinstance(event, str) or not event:
            raise UsageError(f"event names must be non-empty strings, got {event!r}")
        return self._resolve(event)

    def _resolve_uncached(self, event: str) -> Resolution:
        prof = self.profile
        base: dict[str, Price | Free] = {**prof.prices, **prof.free}
        hit = _best(base, event)
        if self.nested and prof.nested is not None:
            over = _best(prof.nested.prices, event)
            if over is not None and (hit is None or len(over.key) >= len(hit.key)):
                return Resolution(event, over.key, False, over.cycles, over.component,
                                  over.basis, over.source, "override")
        if hit is None:
            raise UnpricedEventError(event, prof)
        if isinstance(hit, Free):
            return Resolution(event, hit.key, True, 0.0, None, "free", hit.reason)
        unit, rule = hit.cycles, ""
        if self.nested and prof.nested is not None and hit.component in prof.nested.scale:
            factor = prof.nested.scale[hit.component]
            unit, rule = hit.cycles * factor, f"scale x{factor:g}"
            return Resolution(event, hit.key, False, unit, hit.component, hit.basis,
                              hit.source, rule, factor)
        return Resolution(event, hit.key, False, unit, hit.component, hit.basis, hit.source, rule)

    def check(self, events) -> None:
        """Raise :class:`UnpricedEventError` for the first event name the profile does not know."""
        for name in events:
            self.resolve(name)

    def price(self, events: Mapping[str, float], iterations: int = 1) -> Pricing:
        """Price the counts of a batch of ``iterations`` notifications.

        ``events`` maps event names to counts over the whole batch (non-negative numbers; a
        Counter from the models). Returns per-notification cycles and breakdown, and the batch
        totals.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
            raise UsageError(f"iterations must be a positive integer, got {iterations!r}")
        totals = {c: 0.0 for c in COMPONENTS}
        items: list[LineItem] = []
        sources: dict[str, str] = {}
        for name in sorted(events):
            count = events[name]
            if isinstance(count, bool) or not isinstance(count, (int, float)) \
                    or not math.isfinite(count) or count < 0:
                raise UsageError(f"event {name!r}: count must be a finite number >= 0, "
                                 f"got {count!r}")
            r = self.resolve(name)
            if count == 0:
                continue
            cycles = count * r.unit_cycles
            if r.component is not None:
                totals[r.component] += cycles
                sources[r.key] = r.source
            items.append(LineItem(name, count, r.key, r.component, r.unit_cycles, cycles,
                                  r.basis, r.source, r.nested_rule))
        total = sum(totals.values())
        per = {c: v / iterations for c, v in totals.items()}
        return Pricing(
            profile=self.profile.name,
            nested=self.nested,
            iterations=iterations,
            cycles=sum(per.values()),
            breakdown=per,
            total_cycles=total,
            total_breakdown=totals,
            items=tuple(items),
            sources=sources,
        )

    def coefficients(self, events: Mapping[str, float], iterations: int = 1) -> dict[str, float]:
        """Per notification, how many times each price is paid (nested scale included): the
        cost is linear in the prices, ``cycles == sum(coef[id] * price(id).cycles)``, so a
        price change re-prices a stored event vector without the models
        (:mod:`fastmmio.costs.linear`). Keys are price ids (:attr:`Resolution.price_id`)."""
        out: dict[str, float] = {}
        for name, count in events.items():
            r = self.resolve(name)
            pid = r.price_id
            if pid is not None and count:
                out[pid] = out.get(pid, 0.0) + count * r.factor / iterations
        return out

    def cost(self, events: Mapping[str, float]) -> Pricing:
        """Price a count vector that is already per notification (``iterations=1``)."""
        return self.price(events, 1)

    def unit(self, event: str) -> float:
        """The price in cycles of one occurrence of ``event`` (0 when free)."""
        return self.resolve(event).unit_cycles


def price(events: Mapping[str, float], iterations: int = 1, profile: Profile | str | Path =
          "skylake-sp", *, nested: bool | None = None) -> Pricing:
    """One-shot: ``CostModel(profile, nested=nested).price(events, iterations)``."""
    return CostModel(profile, nested=nested).price(events, iterations)


def check_prices(profile: Profile | str | Path, *, nested: bool = False) -> None:
    # (``nested``: whether KVM runs under an L0; the nested.* events are in the vocabulary
    # either way, so a profile must price them to pass)
    """Refuse, before any simulation, a profile that lacks a price for an event the models
    can count (:func:`fastmmio.sim.events.vocabulary`): the :class:`UnpricedEventError` it
    would otherwise raise at the first run that counts it, perhaps after minutes of work."""
    from fastmmio.sim.events import vocabulary

    CostModel(profile, nested=nested).check(sorted(vocabulary()))
