"""kvm-unit-tests figures: the name-to-route table, published anchor sets, and ``x86/vmexit``
output as input.

* The mapping (``data/kut.toml``): each kvm-unit-tests test name, per era, to the catalogue
  route that makes the same access on the same KVM path, or why there is none. A name can
  mean another path in another era: ``mmio-wildcard-eventfd:pci-mem`` was a length-1 ioeventfd
  when QEMU commit 22773d60 added pci-testdev (2013) and is a length-0 one (KVM_FAST_MMIO_BUS)
  today. ``fastmmio bench --format kut`` prints today's names, ``bench --list`` shows the
  table, and ``fastmmio calibrate`` maps figures through it.
* Anchors (``data/anchors/*.toml``): published figure sets, each with the CPU (or "not
  named"), the kernel, the date, the era of its names, the simulated KVM variant closest to
  the KVM it ran on, and its primary source (commit id, subject, author, where in it).
* :func:`parse_kut_log`: the ``NAME CYCLES`` lines of kvm-unit-tests' ``x86/vmexit`` output;
  every other line (banners, "PM timer port is ...", PASS/SUMMARY, blank) is ignored and
  counted.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from fastmmio.errors import UsageError

CURRENT_ERA = "current"


@dataclass(frozen=True)
class Era:
    name: str
    description: str
    kernel: str
    qemu: str


@dataclass(frozen=True)
class KutEntry:
    """One row of the table: a test name in an era, and its route (or why it has none)."""

    name: str
    era: str
    route: str | None
    why: str = ""
    note: str = ""


@dataclass(frozen=True)
class KutTable:
    eras: dict[str, Era]
    entries: tuple[KutEntry, ...]

    def lookup(self, name: str, era: str = CURRENT_ERA) -> KutEntry | None:
        """The entry of ``name`` in ``era``, falling back to today's meaning when the era does
        not list the name (the name meant the same then)."""
        for e in self.entries:
            if e.name == name and e.era == era:
                return e
        if era != CURRENT_ERA:
            return self.lookup(name, CURRENT_ERA)
        return None

    def name_for_route(self, route: str, era: str = CURRENT_ERA) -> str | None:
        """The test name that ``route`` measures in ``era`` (the first listed), or None."""
        for e in self.entries:
            if e.route == route and e.era == era:
                return e.name
        return None

    def names(self) -> list[str]:
        return list(dict.fromkeys(e.name for e in self.entries))


def _str(table: dict, key: str, where: str, required: bool = True) -> str:
    v = table.get(key, "")
    if not isinstance(v, str) or (required and not v):
        raise UsageError(f"{where}: '{key}' must be a non-empty string")
    return v


def parse_kut_table(text: str, source: str = "kut.toml") -> KutTable:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: {exc}") from None
    eras = {}
    for name, raw in (doc.get("era") or {}).items():
        where = f"{source}: era {name}"
        eras[name] = Era(name, _str(raw, "description", where), _str(raw, "kernel", where),
                         _str(raw, "qemu", where))
    if CURRENT_ERA not in eras:
        raise UsageError(f"{source}: no [era.{CURRENT_ERA}]")
    entries = []
    seen = set()
    for i, raw in enumerate(doc.get("test") or []):
        where = f"{source}: test #{i + 1}"
        name = _str(raw, "name", where)
        era = _str(raw, "era", where)
        if era not in eras:
            raise UsageError(f"{where} ({name}): unknown era {era!r}")
        route = raw.get("route")
        why = raw.get("why", "")
        if (route is None) == (not why):
            raise UsageError(f"{where} ({name}): give either a route or why there is none")
        if (name, era) in seen:
            raise UsageError(f"{where}: {name} listed twice for era {era}")
        seen.add((name, era))
        entries.append(KutEntry(name, era, route, why, raw.get("note", "")))
    return KutTable(eras, tuple(entries))


@lru_cache(maxsize=1)
def load_kut_table() -> KutTable:
    text = resources.files("fastmmio").joinpath("data/kut.toml").read_text()
    return parse_kut_table(text)


# ------------------------------------------------------------------------------------------
# anchors
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # "commit" (or "message": a list message with its date and subject)
    repository: str
    id: str
    subject: str
    author: str
    where: str

    def cite(self) -> str:
        return (f"{self.repository} {self.kind} {self.id} '{self.subject}' ({self.author}), "
                f"{self.where}")


@dataclass(frozen=True)
class Anchor:
    """A published set of kvm-unit-tests figures."""

    name: str
    description: str
    cpu: str
    kernel: str
    date: str
    era: str
    variant: str
    source: Source
    figures: dict[str, float] = field(default_factory=dict)

    def cite(self) -> str:
        return f"{self.source.cite()}; CPU {self.cpu}; {self.kernel}; {self.date}"


def parse_anchor(text: str, source: str) -> Anchor:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: {exc}") from None
    a, s, figs = doc.get("anchor"), doc.get("source"), doc.get("figures")
    if not isinstance(a, dict) or not isinstance(s, dict) or not isinstance(figs, dict):
        raise UsageError(f"{source}: needs [anchor], [source] and [figures] tables")
    where = f"{source} [anchor]"
    src = Source(*(_str(s, k, f"{source} [source]") for k in
                   ("kind", "repository", "id", "subject", "author", "where")))
    figures: dict[str, float] = {}
    for k, v in figs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise UsageError(f"{source} [figures]: {k} must be a positive number of cycles")
        figures[k] = float(v)
    era = _str(a, "era", where)
    if era not in load_kut_table().eras:
        raise UsageError(f"{where}: unknown era {era!r}")
    return Anchor(_str(a, "name", where), _str(a, "description", where), _str(a, "cpu", where),
                  _str(a, "kernel", where), _str(a, "date", where), era,
                  _str(a, "variant", where), src, figures)


def anchor_names() -> list[str]:
    d = resources.files("fastmmio").joinpath("data/anchors")
    return sorted(p.name.removesuffix(".toml") for p in d.iterdir() if p.name.endswith(".toml"))


def load_anchor(name: str) -> Anchor:
    """The bundled anchor set ``name``; an unknown name is a :class:`UsageError` naming them."""
    names = anchor_names()
    if name not in names:
        raise UsageError(f"unknown anchor set {name!r}; anchor sets: {', '.join(names)}")
    text = resources.files("fastmmio").joinpath(f"data/anchors/{name}.toml").read_text()
    return parse_anchor(text, f"anchors/{name}.toml")


# ------------------------------------------------------------------------------------------
# kvm-unit-tests output
# ------------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.:-]*)\s+(\d+(?:\.\d+)?)\s*$")


@dataclass
class KutLog:
    figures: dict[str, float]  # name -> cycles (the last line of a name wins)
    ignored: int  # lines that are not NAME CYCLES
    repeated: list[str]  # names that appeared more than once


def parse_kut_log(text: str) -> KutLog:
    """The ``NAME CYCLES`` lines of kvm-unit-tests ``x86/vmexit`` output (a name and one
    number, nothing else on the line; a trailing carriage return is allowed)."""
    figures: dict[str, float] = {}
    ignored = 0
    repeated = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            ignored += 1
            continue
        name, value = m.group(1), float(m.group(2))
        if name in figures:
            repeated.append(name)
        figures[name] = value
    return KutLog(figures, ignored, repeated)


def describe_table(table: KutTable | None = None) -> list[str]:
    """``bench --list``: the mapping, one line per name and era."""
    table = table or load_kut_table()
    out = []
    for era in table.eras.values():
        out.append(f"era {era.name}: {era.description} ({era.kernel}; {era.qemu})")
        for e in table.entries:
            if e.era != era.name:
                continue
            target = e.route if e.route else "no route: " + e.why
            out.append(f"  {e.name:34} {target}" + (f"  ({e.note})" if e.note else ""))
    return out

