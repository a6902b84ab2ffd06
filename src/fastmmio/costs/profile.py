"""CPU cost profiles: the price in cycles of every event the models count, as TOML data.

A profile is a TOML file (read with :mod:`tomllib`). Bundled ones live in
``fastmmio/costs/profiles/``; a user can pass the path of their own. Every figure carries where
it comes from. The schema (every table and field; anything else is an error):

.. code-block:: toml

    [profile]
    name = "skylake-sp"                 # required; the name users select it by
    description = "..."                 # required, one line
    cpu = "Intel Xeon Scalable ..."     # required: what the figures describe
    nested = false                      # optional: default of the nested setting (see below)
    notes = "..."                       # optional, free text
    extends = "skylake-sp"              # optional: a bundled name or a path (see below)

    [sources]                           # optional: citations by short name
    anandtech-skx = "AnandTech, ... (2017), page 4"

    [price."walk.served.l1"]            # one table per event name or dotted prefix
    cycles = 4                          # required: >= 0, finite (int or float)
    component = "walk"                  # required: one of COMPONENTS
    basis = "measured"                  # required: measured | derived | estimate | fitted | user
    source = "anandtech-skx"            # required: a [sources] name, or the citation itself
    exact = false                       # optional: true = this exact name only, no prefix use
    note = "..."                        # optional
    prior = 1000                        # optional: the value before a fit replaced it
    low = 2                             # optional: the plausible interval [low, high]
    high = 6                            #   (both or neither; low <= cycles <= high)
    why = "..."                         # required with an interval: what sizes it
    depends = ["exit", "kvm.skip"]      # optional: the prices this one was derived from

    [free."walk.ref"]                   # events that are explicitly not priced
    reason = "..."                      # required: why they cost nothing of their own
    exact = false                       # optional, as above

    [nested]                            # optional: KVM itself running as a guest
    description = "..."                 # required
    source = "..."                      # required
    scale = { exit = 1.0 }              # optional: component -> factor (>= 0)
    [nested.price."exit"]               # optional: same fields as [price.*]
    ...

    [fit]                               # optional: written by fastmmio.costs.fit (see there)

**Matching.** An event name matches a key when it equals the key or starts with the key
followed by a dot (``exit`` matches ``exit.CPUID``, not ``exitx``). Among the matching keys of
``[price]`` and ``[free]`` the longest (most specific) wins. A key with ``exact = true`` only
matches its own name. An event no key matches is an error (:class:`UnpricedEventError`), so a
new model event can never silently cost zero.

**Nested.** With the nested setting on (KVM is a guest of another hypervisor, so each of its
VM exits is itself reflected through L0), a price is taken from ``[nested.price]`` when the most
specific matching key overall is one of those; otherwise the base price is multiplied by
``[nested].scale[component]`` (1 when absent). A profile without ``[nested]`` refuses the
nested setting rather than pretending it costs the same. The bundled profiles override and
scale nothing: the simulator models the L0 step by step (:mod:`fastmmio.sim.nested`) and
counts its work as ``nested.*`` events, priced in ``[price]`` like any other.

**Sources.** A ``source`` that is a single word (no white space) must name an entry of
``[sources]``; anything longer is the citation itself. ``basis`` says what kind of figure it is:
``measured`` (a published measurement of this very quantity), ``derived`` (computed from
published measurements, the computation in ``source``/``note``), ``estimate`` (no measurement:
the reason in ``source``), ``fitted`` (by :mod:`fastmmio.costs.fit`; the record in ``[fit]``), ``user`` (a figure the
user gave without more: ``--price EVENT=CYCLES`` on the command line, see
:func:`override_prices`).

**Intervals.** ``low``/``high`` bound where the true price plausibly lies, and ``why`` says what
sizes the interval (for an estimate: the length of the code path it stands for; for a fitted
price: the fit's residuals, as :mod:`fastmmio.costs.fit` writes them; for a derived one: the
published range and the intervals of what it subtracts). A price without an interval is held
at its value by the break-even and uncertainty analyses (:mod:`fastmmio.costs.linear`); the
bundled profiles give one to every price that is not a published measurement.

**Dependencies.** ``depends`` names the ``[price]`` keys a derived price was computed from (a
``[nested.price]`` may name base keys too). :meth:`Profile.estimate_roots` follows them: a price
leans on an estimate when it is one or when anything it depends on (transitively) does. An
unknown key or a cycle is an error.

**Inheritance.** ``extends`` names the profile this one starts from: a bundled name, or a path
(relative to the extending file's folder). The parent is read and validated on its own first,
then the child is laid over it, table by table: ``[profile]`` fields the child does not give
(``description``, ``cpu``, ``nested``) are the parent's (its ``notes`` are not: they
describe the parent's figures); ``[sources]`` are merged
(the child's entry wins on a name both define); a ``[price]``, ``[free]`` or
``[nested.price]`` key only the parent has is kept, a key only the child has is added. A key
both have is merged field by field, and a child that gives ``cycles`` gives a new figure: it
must then say its ``basis`` and ``source``, and the parent's ``note``, ``prior``, interval
(``low``, ``high``, ``why``) and ``depends`` (what described and sized the parent's figure)
are dropped unless the child gives its own, while ``component`` and
``exact`` (what the event is) are kept unless the child gives them; a child that gives no
``cycles`` only adds to the parent's figure (a ``note``, or an interval, which must then
contain the inherited cycles). A key the child moves from
``[price]`` to ``[free]`` (or back) leaves the parent's table. ``[nested]`` merges the same way
(``scale`` by component). The parent's ``[fit]`` record is kept unless the child gives its own
or overrides a price the fit moved (the record would no longer describe the prices). Chains
(a parent that extends another) are followed; a cycle is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from fastmmio.errors import ProfileError, did_you_mean

COMPONENTS = (
    "exit",  # VM exit + VM entry round trip and KVM's common run-loop code around it
    "walk",  # page-walk memory references by where they were served, A/D-flag writes
    "handler",  # exit handlers and KVM MMU path steps
    "bus",  # kvm_io_bus look-ups (base + per probe), coalesced-ring appends
    "eventfd",  # eventfd_signal
    "emulation",  # the x86 emulator: fetch, software walk, decode, execute
    "skip",  # advancing RIP past the instruction (VMCS length or decode)
    "userspace",  # KVM_RUN returning to the VMM, its handling, and the next KVM_RUN
    "guest",  # the guest's own instructions (the loop)
)
"""Cost components, in report order; every breakdown has exactly these keys."""

BASES = ("measured", "derived", "estimate", "fitted", "user")

MAX_PRICE = 1e7
"""The largest price a profile may give one event, in cycles: the dearest event the models
count (an exit to userspace and back) costs some 10^4 cycles, so anything near 10^7 (several
milliseconds) is a mistake, and a figure like 1e300 would make every sum meaningless."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_SOURCE_NAME_RE = re.compile(r"^\S+$")

_PROFILE_FIELDS = {"name", "description", "cpu", "nested", "notes", "extends"}
_TOP_FIELDS = {"profile", "sources", "price", "free", "nested", "fit"}
_PRICE_FIELDS = {"cycles", "component", "basis", "source", "exact", "note", "prior", "low",
                 "high", "why", "depends"}
_FREE_FIELDS = {"reason", "exact"}
_NESTED_FIELDS = {"description", "source", "scale", "price"}
_FIT_FIELDS = {"method", "weighting", "regularization", "free", "events_source", "notes",
               "rank", "target"}
_FIT_TARGET_FIELDS = {"route", "cycles", "source", "events", "fitted", "residual", "percent"}


@dataclass(frozen=True)
class Price:
    """The price of one event name or dotted family of names."""

    key: str
    cycles: float
    component: str
    basis: str
    source: str  # the citation text (a [sources] reference already resolved)
    source_ref: str | None = None  # the [sources] name used, if any
    exact: bool = False
    note: str = ""
    prior: float | None = None
    low: float | None = None  # the plausible interval [low, high] (None: none given)
    high: float | None = None
    why: str = ""  # what sizes the interval
    depends: tuple[str, ...] = ()  # the price keys this one was derived from

    @property
    def interval(self) -> tuple[float, float] | None:
        """``(low, high)``, or None when the profile gives no interval."""
        if self.low is None or self.high is None:
            return None
        return (self.low, self.high)


@dataclass(frozen=True)
class Free:
    """An event name or family explicitly priced at nothing, and why."""

    key: str
    reason: str
    exact: bool = False


@dataclass(frozen=True)
class Nested:
    """How the profile prices KVM running as a guest (L1) of another hypervisor."""

    description: str
    source: str
    scale: Mapping[str, float] = field(default_factory=dict)
    prices: Mapping[str, Price] = field(default_factory=dict)


@dataclass(frozen=True)
class FitTarget:
    """One published figure a fit was made against, with the event vector it was held to."""

    route: str
    cycles: float
    source: str
    events: Mapping[str, float]
    fitted: float | None = None
    residual: float | None = None
    percent: float | None = None


@dataclass(frozen=True)
class FitRecord:
    """The ``[fit]`` table: what was fitted, to what, how, and how well."""

    free: tuple[str, ...]
    targets: tuple[FitTarget, ...]
    method: str = ""
    weighting: str = "relative"
    regularization: float = 0.0
    events_source: str = ""
    notes: str = ""
    rank: int | None = None


@dataclass(frozen=True)
class Profile:
    """A CPU cost profile (see the module docstring for the file format)."""

    name: str
    description: str
    cpu: str
    origin: str  # the file it was read from
    prices: Mapping[str, Price]
    free: Mapping[str, Free]
    sources: Mapping[str, str] = field(default_factory=dict)
    nested: Nested | None = None
    nested_default: bool = False
    notes: str = ""
    fit: FitRecord | None = None
    #: the origins of the profiles this one extends, nearest first (``extends``)
    extends: tuple[str, ...] = ()

    def price_entry(self, pid: str) -> Price:
        """The price by id: a ``[price]`` key, or ``nested:<key>`` for ``[nested.price]``."""
        if pid.startswith("nested:"):
            if self.nested is None or pid[7:] not in self.nested.prices:
                raise KeyError(pid)
            return self.nested.prices[pid[7:]]
        return self.prices[pid]

    def estimate_roots(self, pid: str) -> tuple[str, ...]:
        """The estimated prices ``pid`` (a price id as in :meth:`price_entry`) rests on: itself
        when its basis is ``estimate``, and every estimate reached through ``depends``
        (transitively); sorted, empty when it rests on none."""
        out: set[str] = set()
        seen: set[str] = set()
        todo = [pid]
        while todo:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            p = self.price_entry(cur)
            if p.basis == "estimate":
                out.add(cur)
            todo.extend(p.depends)
        return tuple(sorted(out))

    def citations(self) -> dict[str, str]:
        """Every price key (base and nested) -> its citation text."""
        out = {k: p.source for k, p in self.prices.items()}
        if self.nested is not None:
            out.update({f"nested:{k}": p.source for k, p in self.nested.prices.items()})
        return out


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------


class _Ctx:
    """Where we are, for error messages: the file and the dotted field path."""

    def __init__(self, origin: str):
        self.origin = origin

    def error(self, where: str, msg: str) -> ProfileError:
        return ProfileError(f"profile {self.origin}: {where}: {msg}")


def _fmt_key(table: str, key: str) -> str:
    return f'{table}."{key}"'


def _check_fields(ctx: _Ctx, table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise ctx.error(where, f"must be a table, not {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ctx.error(f"{where}.{unknown[0]}",
                        f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return table


def _string(ctx: _Ctx, table: dict, name: str, where: str, required: bool = True,
            nonempty: bool = True) -> str:
    if name not in table:
        if required:
            raise ctx.error(f"{where}.{name}", "missing (required)")
        return ""
    v = table[name]
    if not isinstance(v, str):
        raise ctx.error(f"{where}.{name}", f"must be a string, not {type(v).__name__}")
    if nonempty and not v.strip():
        raise ctx.error(f"{where}.{name}", "must not be empty")
    return v


def _bool(ctx: _Ctx, table: dict, name: str, where: str, default: bool = False) -> bool:
    if name not in table:
        return default
    v = table[name]
    if not isinstance(v, bool):
        raise ctx.error(f"{where}.{name}", f"must be true or false, not {type(v).__name__}")
    return v


def _number(ctx: _Ctx, v: Any, where: str, what: str = "cycles") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ctx.error(where, f"must be a number ({what}), not {type(v).__name__}")
    if not math.isfinite(v):
        raise ctx.error(where, f"must be finite, not {v}")
    if v < 0:
        raise ctx.error(where, f"must not be negative ({what}), got {v}")
    if what == "cycles" and v > MAX_PRICE:
        raise ctx.error(where, f"{v:g} cycles is above the sanity bound of {MAX_PRICE:g} "
                               "(a few milliseconds of CPU time for one event: a typo or a "
                               "unit mix-up, not a price)")
    return float(v)


def _check_key(ctx: _Ctx, key: str, where: str) -> None:
    if not _KEY_RE.match(key):
        raise ctx.error(where, f"{key!r} is not an event name or dotted prefix "
                               "(letters, digits, _ separated by single dots)")


def _resolve_source(ctx: _Ctx, text: str, sources: Mapping[str, str],
                    where: str) -> tuple[str, str | None]:
    if _SOURCE_NAME_RE.match(text.strip()):
        name = text.strip()
        if name not in sources:
            raise ctx.error(where, f"names no entry of [sources]: {name!r} (a one-word source "
                                   "must be a [sources] name; write a citation in words)")
        return sources[name], name
    return text, None


def _parse_price(ctx: _Ctx, key: str, raw: Any, sources: Mapping[str, str],
                 table: str) -> Price:
    where = _fmt_key(table, key)
    _check_key(ctx, key, where)
    _check_fields(ctx, raw, _PRICE_FIELDS, where)
    if "cycles" not in raw:
        raise ctx.error(f"{where}.cycles", "missing (required)")
    cycles = _number(ctx, raw["cycles"], f"{where}.cycles")
    component = _string(ctx, raw, "component", where)
    if component not in COMPONENTS:
        raise ctx.error(f"{where}.component",
                        f"unknown component {component!r} (one of {', '.join(COMPONENTS)})")
    basis = _string(ctx, raw, "basis", where)
    if basis not in BASES:
        raise ctx.error(f"{where}.basis", f"must be one of {', '.join(BASES)}, not {basis!r}")
    src_text = _string(ctx, raw, "source", where)
    source, ref = _resolve_source(ctx, src_text, sources, f"{where}.source")
    prior = None
    if "prior" in raw:
        prior = _number(ctx, raw["prior"], f"{where}.prior")
    low = high = None
    if ("low" in raw) != ("high" in raw):
        raise ctx.error(f"{where}.{'high' if 'low' in raw else 'low'}",
                        "missing: an interval needs both low and high")
    why = _string(ctx, raw, "why", where, required=False)
    if "low" in raw:
        low = _number(ctx, raw["low"], f"{where}.low")
        high = _number(ctx, raw["high"], f"{where}.high")
        if not low <= cycles <= high:
            raise ctx.error(where, f"interval {low:g}-{high:g} does not contain cycles "
                                   f"{cycles:g} (need low <= cycles <= high)")
        if not why:
            raise ctx.error(f"{where}.why", "missing: say what sizes the interval "
                                            "(required with low/high)")
    elif why:
        raise ctx.error(f"{where}.why", "given without an interval (low, high)")
    deps = raw.get("depends", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ctx.error(f"{where}.depends", "must be a list of price keys")
    for d in deps:
        _check_key(ctx, d, f"{where}.depends")
    return Price(
        key=key,
        cycles=cycles,
        component=component,
        basis=basis,
        source=source,
        source_ref=ref,
        exact=_bool(ctx, raw, "exact", where),
        note=_string(ctx, raw, "note", where, required=False),
        prior=prior,
        low=low,
        high=high,
        why=why,
        depends=tuple(dict.fromkeys(deps)),
    )


def _check_depends(ctx: _Ctx, prices: Mapping[str, Price], nested: Nested | None) -> None:
    """Every ``depends`` names a known price key, and the dependencies form no cycle."""
    graph: dict[str, tuple[str, ...]] = {}
    tables = [("price", "", prices)]
    if nested is not None:
        tables.append(("nested.price", "nested:", nested.prices))
    for table, prefix, entries in tables:
        for key, p in entries.items():
            for d in p.depends:
                if d not in prices:
                    raise ctx.error(f"{_fmt_key(table, key)}.depends",
                                    f"{d!r} is not a key of [price]")
            graph[prefix + key] = p.depends
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for d in graph.get(node, ()):
            if state.get(d) == 1:
                loop = path[path.index(d):] + [d] if d in path else [node, d]
                raise ctx.error(f"{_fmt_key('price', d)}.depends",
                                "dependency cycle: " + " -> ".join(loop))
            if d not in state:
                visit(d, path + [d])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def _parse_free(ctx: _Ctx, key: str, raw: Any) -> Free:
    where = _fmt_key("free", key)
    _check_key(ctx, key, where)
    _check_fields(ctx, raw, _FREE_FIELDS, where)
    return Free(key=key, reason=_string(ctx, raw, "reason", where),
                exact=_bool(ctx, raw, "exact", where))


def _parse_nested(ctx: _Ctx, raw: Any, sources: Mapping[str, str]) -> Nested:
    _check_fields(ctx, raw, _NESTED_FIELDS, "nested")
    description = _string(ctx, raw, "description", "nested")
    source, _ = _resolve_source(ctx, _string(ctx, raw, "source", "nested"), sources,
                                "nested.source")
    scale: dict[str, float] = {}
    if "scale" in raw:
        rs = raw["scale"]
        if not isinstance(rs, dict):
            raise ctx.error("nested.scale", "must be a table of component = factor")
        for comp, factor in rs.items():
            if comp not in COMPONENTS:
                raise ctx.error(f"nested.scale.{comp}",
                                f"unknown component (one of {', '.join(COMPONENTS)})")
            scale[comp] = _number(ctx, factor, f"nested.scale.{comp}", "a factor")
    prices: dict[str, Price] = {}
    if "price" in raw:
        rp = raw["price"]
        if not isinstance(rp, dict):
            raise ctx.error("nested.price", "must be a table of price tables")
        for key, entry in rp.items():
            prices[key] = _parse_price(ctx, key, entry, sources, "nested.price")
    return Nested(description=description, source=source, scale=scale, prices=prices)


def _parse_events(ctx: _Ctx, raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ctx.error(where, "must be a table of event name = count")
    out = {}
    for name, count in raw.items():
        _check_key(ctx, name, f'{where}."{name}"')
        out[name] = _number(ctx, count, f'{where}."{name}"', "a count")
    return out


def _parse_fit(ctx: _Ctx, raw: Any, prices: Mapping[str, Price],
               sources: Mapping[str, str]) -> FitRecord:
    _check_fields(ctx, raw, _FIT_FIELDS, "fit")
    free = raw.get("free", [])
    if not isinstance(free, list) or not all(isinstance(k, str) for k in free):
        raise ctx.error("fit.free", "must be a list of price keys")
    for k in free:
        if k not in prices:
            raise ctx.error("fit.free", f"{k!r} is not a key of [price]")
    weighting = _string(ctx, raw, "weighting", "fit", required=False) or "relative"
    if weighting not in ("relative", "absolute"):
        raise ctx.error("fit.weighting", f"must be 'relative' or 'absolute', not {weighting!r}")
    reg = 0.0
    if "regularization" in raw:
        reg = _number(ctx, raw["regularization"], "fit.regularization", "a weight")
    rank = None
    if "rank" in raw:
        if isinstance(raw["rank"], bool) or not isinstance(raw["rank"], int):
            raise ctx.error("fit.rank", "must be an integer")
        rank = raw["rank"]
    rt = raw.get("target", [])
    if not isinstance(rt, list):
        raise ctx.error("fit.target", "must be an array of tables ([[fit.target]])")
    targets = []
    for i, t in enumerate(rt):
        where = f"fit.target[{i}]"
        _check_fields(ctx, t, _FIT_TARGET_FIELDS, where)
        route = _string(ctx, t, "route", where)
        if "cycles" not in t:
            raise ctx.error(f"{where}.cycles", "missing (required)")
        cycles = _number(ctx, t["cycles"], f"{where}.cycles")
        source, _ = _resolve_source(ctx, _string(ctx, t, "source", where), sources,
                                    f"{where}.source")
        if "events" not in t:
            raise ctx.error(f"{where}.events", "missing (required)")
        events = _parse_events(ctx, t["events"], f"{where}.events")
        extra: dict[str, float | None] = {}
        for name in ("fitted", "residual", "percent"):
            v = t.get(name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ctx.error(f"{where}.{name}", "must be a finite number")
                v = float(v)
            extra[name] = v
        targets.append(FitTarget(route=route, cycles=cycles, source=source, events=events,
                                 **extra))
    return FitRecord(
        free=tuple(free),
        targets=tuple(targets),
        method=_string(ctx, raw, "method", "fit", required=False),
        weighting=weighting,
        regularization=reg,
        events_source=_string(ctx, raw, "events_source", "fit", required=False),
        notes=_string(ctx, raw, "notes", "fit", required=False),
        rank=rank,
    )


def parse_profile(text: str, origin: str = "<string>", *,
                  base_dir: str | Path | None = None) -> Profile:
    """Parse and validate profile TOML text; errors are :class:`ProfileError` naming
    ``origin`` and the field. A relative ``extends`` path is read from ``base_dir`` (default:
    the current directory)."""
    doc, lineage = _merged_doc(text, origin, Path(base_dir) if base_dir else None,
                               ((_identity_of_origin(origin), origin),))
    return _build(_Ctx(origin), doc, origin, lineage)


def _toml_doc(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {origin}: not valid TOML: {exc}") from None


def _identity_of_origin(origin: str) -> str:
    """What an origin is for the cycle check: the resolved path of a file, else the text."""
    p = Path(origin)
    return str(p.resolve()) if p.is_file() else origin


def _build(ctx: _Ctx, doc: dict, origin: str, lineage: tuple[str, ...]) -> Profile:
    """The :class:`Profile` of a (merged) document, every field validated."""
    _check_fields(ctx, doc, _TOP_FIELDS, "(top level)")
    if "profile" not in doc:
        raise ctx.error("profile", "missing [profile] table (name, description, cpu)")
    head = _check_fields(ctx, doc["profile"], _PROFILE_FIELDS, "profile")
    name = _string(ctx, head, "name", "profile")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise ctx.error("profile.name", f"{name!r}: use letters, digits, '.', '_', '-'")
    sources: dict[str, str] = {}
    if "sources" in doc:
        rs = doc["sources"]
        if not isinstance(rs, dict):
            raise ctx.error("sources", "must be a table of name = citation")
        for sname, cite in rs.items():
            if not _SOURCE_NAME_RE.match(sname):
                raise ctx.error(f"sources.{sname}", "a source name must be one word")
            if not isinstance(cite, str) or not cite.strip():
                raise ctx.error(f"sources.{sname}", "must be a non-empty string (the citation)")
            sources[sname] = cite

    prices: dict[str, Price] = {}
    rp = doc.get("price", {})
    if not isinstance(rp, dict):
        raise ctx.error("price", "must be a table of price tables")
    for key, raw in rp.items():
        prices[key] = _parse_price(ctx, key, raw, sources, "price")
    free: dict[str, Free] = {}
    rf = doc.get("free", {})
    if not isinstance(rf, dict):
        raise ctx.error("free", "must be a table of free tables")
    for key, raw in rf.items():
        if key in prices:
            raise ctx.error(_fmt_key("free", key), "the same key is also under [price]")
        free[key] = _parse_free(ctx, key, raw)
    if not prices:
        raise ctx.error("price", "a profile needs at least one [price.\"...\"] table")

    nested = _parse_nested(ctx, doc["nested"], sources) if "nested" in doc else None
    nested_default = _bool(ctx, head, "nested", "profile")
    if nested_default and nested is None:
        raise ctx.error("profile.nested", "is true but the profile has no [nested] table")

    _check_depends(ctx, prices, nested)

    fit = None
    if "fit" in doc:
        fit = _parse_fit(ctx, doc["fit"], prices, sources)

    return Profile(
        name=name,
        description=_string(ctx, head, "description", "profile"),
        cpu=_string(ctx, head, "cpu", "profile"),
        origin=origin,
        prices=prices,
        free=free,
        sources=sources,
        nested=nested,
        nested_default=nested_default,
        notes=_string(ctx, head, "notes", "profile", required=False),
        fit=fit,
        extends=lineage,
    )


# ------------------------------------------------------------------------------------------
# inheritance (extends) and command-line overrides
# ------------------------------------------------------------------------------------------


def _merged_doc(text: str, origin: str, base_dir: Path | None,
                chain: tuple[tuple[str, str], ...]) -> tuple[dict, tuple[str, ...]]:
    """The document of ``text`` with its ``extends`` chain laid under it (see the module
    docstring), and the origins of its ancestors, nearest first. ``chain`` holds the
    (identity, origin) of every profile on the way down, for the cycle check."""
    ctx = _Ctx(origin)
    doc = _toml_doc(text, origin)
    head = doc.get("profile")
    if not isinstance(head, dict) or "extends" not in head:
        return doc, ()
    ref = head["extends"]
    if not isinstance(ref, str) or not ref.strip():
        raise ctx.error("profile.extends", "must be a bundled profile name or a .toml path")
    ident, porigin, ptext, pdir = _locate(ref.strip(), base_dir,
                                          f"profile {origin}: profile.extends: ")
    seen = [i for i, _ in chain]
    if ident in seen:
        loop = [o for _, o in chain[seen.index(ident):]] + [porigin]
        raise ctx.error("profile.extends", "inheritance cycle: " + " -> ".join(loop))
    pdoc, plineage = _merged_doc(ptext, porigin, pdir, chain + ((ident, porigin),))
    _build(_Ctx(porigin), pdoc, porigin, plineage)  # the parent must stand on its own
    return _merge_docs(ctx, pdoc, doc), (porigin,) + plineage


def _table(ctx: _Ctx, doc: dict, name: str) -> dict:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise ctx.error(name, "must be a table")
    return t


#: price fields that say what the event is (kept when a child gives a new figure)
_EVENT_FIELDS = ("component", "exact")


def _merge_price(ctx: _Ctx, where: str, parent: dict, child: Any) -> Any:
    if not isinstance(child, dict):
        return child  # _build reports it
    if "cycles" not in child:
        return {**parent, **child}
    missing = [f for f in ("basis", "source") if f not in child]
    if missing:
        raise ctx.error(f"{where}.{missing[0]}",
                        "missing: a price that overrides the inherited cycles gives its own "
                        "basis and source (the parent's describe the parent's figure)")
    merged = {f: parent[f] for f in _EVENT_FIELDS if f in parent}
    merged.update(child)
    return merged


def _merge_prices(ctx: _Ctx, table: str, parent: dict, child: dict) -> tuple[dict, set[str]]:
    """Parent and child price tables merged; and the keys whose figure the child replaced."""
    out = dict(parent)
    replaced = set()
    for key, entry in child.items():
        if key in parent and isinstance(parent[key], dict):
            out[key] = _merge_price(ctx, _fmt_key(table, key), parent[key], entry)
            if isinstance(entry, dict) and "cycles" in entry:
                replaced.add(key)
        else:
            out[key] = entry
    return out, replaced


def _merge_docs(ctx: _Ctx, parent: dict, child: dict) -> dict:
    """``child`` laid over the (already merged and validated) ``parent`` document."""
    _check_fields(ctx, child, _TOP_FIELDS, "(top level)")
    head = _check_fields(ctx, child.get("profile", {}), _PROFILE_FIELDS, "profile")
    out: dict[str, Any] = {}
    out["profile"] = {k: v for k, v in parent["profile"].items() if k not in ("name", "notes")}
    out["profile"].update({k: v for k, v in head.items() if k != "extends"})
    out["sources"] = {**_table(ctx, parent, "sources"), **_table(ctx, child, "sources")}

    cprice, cfree = _table(ctx, child, "price"), _table(ctx, child, "free")
    price, replaced = _merge_prices(ctx, "price", _table(ctx, parent, "price"), cprice)
    free = {**_table(ctx, parent, "free"), **cfree}
    for key in cfree:
        if key not in cprice:
            price.pop(key, None)  # moved from [price] to [free]
    for key in cprice:
        if key not in cfree:
            free.pop(key, None)  # moved from [free] to [price]
    out["price"], out["free"] = price, free

    if "nested" in parent or "nested" in child:
        pn, cn = _table(ctx, parent, "nested"), _table(ctx, child, "nested")
        nested = {**pn, **{k: v for k, v in cn.items() if k not in ("scale", "price")}}
        if "scale" in pn or "scale" in cn:
            nested["scale"] = {**pn.get("scale", {}), **_table(ctx, cn, "scale")}
        if "price" in pn or "price" in cn:
            nested["price"], nreplaced = _merge_prices(
                ctx, "nested.price", pn.get("price", {}), _table(ctx, cn, "price"))
            replaced |= {f"nested:{k}" for k in nreplaced}
        out["nested"] = nested

    if "fit" in child:
        out["fit"] = child["fit"]
    elif "fit" in parent:
        moved = set(parent["fit"].get("free", ()))
        if not (moved & replaced) and all(k in price for k in moved):
            out["fit"] = parent["fit"]
    return out


def _locate(ref: str | Path, base_dir: Path | None = None,
            prefix: str = "") -> tuple[str, str, str, Path | None]:
    """A profile by bundled name or path: (identity for cycle checks, origin for messages,
    its text, the folder a relative ``extends`` in it is read from)."""
    if isinstance(ref, Path) or _looks_like_path(str(ref), base_dir):
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.exists() and not path.is_file() and not path.is_dir():
            # a device or FIFO (/dev/zero, a pipe) could be read forever
            raise ProfileError(f"{prefix}cannot read profile {path}: not a regular file")
        try:
            text = path.read_text()
        except OSError as exc:
            raise ProfileError(f"{prefix}cannot read profile {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{prefix}cannot read profile {path}: not UTF-8 text "
                               f"({exc.reason} at byte {exc.start})") from None
        return str(path.resolve()), str(path), text, path.resolve().parent
    name = str(ref)
    res = _bundled_dir().joinpath(f"{name}.toml")
    if not res.is_file():
        raise ProfileError(f"{prefix}unknown profile {name!r}{did_you_mean(name, list_profiles())}; "
                           "bundled profiles: "
                           f"{', '.join(list_profiles()) or '(none)'}; or give a .toml path")
    return f"bundled:{name}", f"{name}.toml", res.read_text(), None


def override_prices(profile: Profile, overrides: "Mapping[str, float] | list[tuple[str, float]]",
                    source: str = "the fastmmio command line") -> Profile:
    """``profile`` with some prices replaced by the user's figures (``--price EVENT=CYCLES``).

    Each key must be a ``[price]`` key of the profile, or ``nested:KEY`` for a
    ``[nested.price]`` one (a :class:`ProfileError` naming the closest keys otherwise; a
    ``[free]`` key cannot be priced this way: write a partial profile with ``extends``). The
    figure is held to the same bounds as a file's (finite, >= 0, at most :data:`MAX_PRICE`).
    The new price keeps the event's component and ``exact``; its basis is ``user`` and its
    source ``source`` with the override (``--price exit=1200``); what described the old
    figure (its note, prior, source, interval and depends) is replaced by a note naming the old
    figure."""
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    if not items:
        return profile
    prices = dict(profile.prices)
    nested_prices = dict(profile.nested.prices) if profile.nested is not None else {}
    said = []
    for key, cycles in items:
        where = f"--price {key}={cycles:g}"
        ctx = _Ctx(profile.origin)
        table, name = (nested_prices, key[7:]) if key.startswith("nested:") else (prices, key)
        if name not in table:
            known = list(prices) + [f"nested:{k}" for k in nested_prices]
            if key in profile.free:
                why = "is a [free] key: price it in a profile that extends this one"
            else:
                why = f"is not a price of the profile{did_you_mean(key, known)}"
            raise ctx.error(where, f"{key!r} {why} (its keys: fastmmio profile show "
                                   f"{profile.name})")
        value = _number(ctx, cycles, where)
        old = table[name]
        table[name] = Price(key=name, cycles=value, component=old.component, basis="user",
                            source=f"{source}: --price {key}={cycles:g}", exact=old.exact,
                            note=f"replaces {old.cycles:g} cycles ({old.basis}, {old.source_ref or 'the profile'})")
        said.append(f"{key}={cycles:g}")
    nested = profile.nested
    if nested is not None:
        nested = Nested(nested.description, nested.source, nested.scale, nested_prices)
    return dataclasses.replace(profile, prices=prices, nested=nested,
                               origin=f"{profile.origin} with --price {', '.join(said)}")


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def _bundled_dir():
    return resources.files("fastmmio").joinpath("costs/profiles")


def list_profiles() -> list[str]:
    """Names of the bundled profiles (file stems of ``costs/profiles/*.toml``), sorted."""
    return sorted(p.name[:-5] for p in _bundled_dir().iterdir() if p.name.endswith(".toml"))


def _looks_like_path(name: str, base_dir: Path | None = None) -> bool:
    return (name.endswith(".toml") or "/" in name or "\\" in name or Path(name).exists()
            or (base_dir is not None and (base_dir / name).exists()))


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name (see :func:`list_profiles`), or the profile file at a path.

    Anything ending in ``.toml``, containing a path separator or naming an existing file is
    read as a file; an unknown name is a :class:`ProfileError` listing the bundled ones.
    ``extends`` is followed (see the module docstring).
    """
    ident, origin, text, folder = _locate(name_or_path)
    doc, lineage = _merged_doc(text, origin, folder, ((ident, origin),))
    return _build(_Ctx(origin), doc, origin, lineage)


# ------------------------------------------------------------------------------------------
# the profile as data (results.json)
# ------------------------------------------------------------------------------------------


def profile_to_json(p: Profile) -> dict[str, Any]:
    """The whole profile as JSON: every price with its basis, source and interval, the free
    events, the sources, the [nested] table and the [fit] record. :func:`profile_from_json`
    reads it back into the same :class:`Profile`."""
    return asdict(p)


def _price_from(d: Mapping[str, Any]) -> Price:
    return Price(**{**d, "depends": tuple(d.get("depends") or ())})


def profile_from_json(d: Mapping[str, Any], origin: str = "results.json") -> Profile:
    """A :class:`Profile` from :func:`profile_to_json`'s record (ProfileError for a record
    that is not one)."""
    try:
        nested = None
        if d.get("nested") is not None:
            n = d["nested"]
            nested = Nested(n["description"], n["source"], dict(n.get("scale") or {}),
                            {k: _price_from(v) for k, v in (n.get("prices") or {}).items()})
        fit = None
        if d.get("fit") is not None:
            f = d["fit"]
            fit = FitRecord(**{**f, "free": tuple(f["free"]),
                               "targets": tuple(FitTarget(**t) for t in f["targets"])})
        return Profile(
            name=d["name"], description=d["description"], cpu=d["cpu"],
            origin=f"{d.get('origin', '?')} (as saved in {origin})",
            prices={k: _price_from(v) for k, v in d["prices"].items()},
            free={k: Free(**v) for k, v in (d.get("free") or {}).items()},
            sources=dict(d.get("sources") or {}), nested=nested,
            nested_default=bool(d.get("nested_default", False)), notes=d.get("notes", ""),
            fit=fit, extends=tuple(d.get("extends") or ()))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProfileError(f"{origin}: the saved profile is incomplete or malformed "
                           f"({type(exc).__name__}: {exc})") from None
