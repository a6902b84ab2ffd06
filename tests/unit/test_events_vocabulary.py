"""The event vocabulary (fastmmio.sim.events.vocabulary) covers every event the models can
count, so that checking a profile against it before a run (fastmmio.costs.check_prices) is
sound: a run can never meet an unpriced event the check let through.

Two holds on the models: every event-name literal or f-string the simulator's sources count
must match a name of the vocabulary (a new event name without a vocabulary entry fails here),
and every event actually counted by runs of the whole catalogue under every variant is in it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastmmio.costs import UnpricedEventError, check_prices, load_profile, parse_profile
from fastmmio.sim.events import vocabulary

SIM = Path(__file__).resolve().parents[2] / "src" / "fastmmio" / "sim"
FAMILIES = ("walk.", "tlb.", "psc.", "fault.", "inv.", "exit.", "kvm.", "guest.")


def _event_patterns() -> list[tuple[str, str]]:
    """(where, regex) for each string that a model counts: ``X[KEY] += n`` whose KEY is a
    literal, an f-string or a module-level string constant, starting with an event
    family."""
    out = []
    for path in sorted(SIM.rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                     for t in n.targets if isinstance(t, ast.Name)}
        for aug in ast.walk(tree):
            if not (isinstance(aug, ast.AugAssign) and isinstance(aug.target, ast.Subscript)):
                continue
            node = aug.target
            key = node.slice
            if isinstance(key, ast.Name) and key.id in constants:
                key = ast.Constant(constants[key.id])
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                text = re.escape(key.value)
                literal = key.value
            elif isinstance(key, ast.JoinedStr):
                parts, literal = [], ""
                for v in key.values:
                    if isinstance(v, ast.Constant):
                        parts.append(re.escape(v.value))
                        literal += v.value
                    else:
                        parts.append(r"[A-Za-z0-9_]+")
                        literal += "{}"
                text = "".join(parts)
            else:
                continue
            if literal.startswith(FAMILIES) or literal == "vmentry":
                out.append((f"{path.relative_to(SIM)}:{node.lineno} {literal}", text))
    return out


def test_every_counted_name_in_the_sources_is_in_the_vocabulary():
    names = vocabulary()
    patterns = _event_patterns()
    assert len(patterns) > 40  # the scan found the models' counters
    missing = [where for where, rx in patterns
               if not any(re.fullmatch(rx, n) for n in names)]
    assert not missing, missing


def test_every_event_counted_by_the_catalogue_is_in_the_vocabulary():
    from fastmmio.compare.core import Comparison, sim_options
    from fastmmio.routes import load_catalogue
    from fastmmio.sim.kvm.variants import VARIANTS

    comparison = Comparison(load_profile("skylake-sp"), iterations=1)
    seen: set[str] = set()
    settings = [(v, "sdm-max", True) for v in VARIANTS] + [("upstream", "sdm-max", False)]
    for variant, caches, vpid in settings:
        opts = sim_options(variant, caches, vpid, False)
        for route in load_catalogue():
            run = comparison.simulate(route, opts)
            if run.result is not None:
                seen |= set(run.result.events)
    assert len(seen) > 40
    assert seen <= vocabulary(), sorted(seen - vocabulary())


def test_bundled_profiles_price_the_whole_vocabulary():
    check_prices("skylake-sp")
    check_prices("skylake-sp", nested=True)
    check_prices("pci-testdev-2013")


def test_a_profile_without_a_price_is_refused_before_any_run():
    from importlib import resources

    text = resources.files("fastmmio").joinpath("costs/profiles/skylake-sp.toml").read_text()
    key = '[price."kvm.coalesced.append"]'
    assert key in text
    prof = parse_profile(text.replace(key, '[price."kvm.coalesced_renamed"]'), "broken.toml")
    with pytest.raises(UnpricedEventError, match="kvm.coalesced.append"):
        check_prices(prof)
