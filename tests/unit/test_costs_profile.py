"""CPU cost profiles: loading, the bundled profiles, and every malformed-file case naming the
file and the field (fastmmio.costs.profile)."""

from __future__ import annotations

import pytest

from fastmmio.costs.profile import (
    BASES,
    COMPONENTS,
    list_profiles,
    load_profile,
    parse_profile,
)
from fastmmio.errors import ProfileError, UsageError

VALID = """
[profile]
name = "tiny"
description = "a test profile"
cpu = "none"

[sources]
book = "A Book, page 1"

[price."exit"]
cycles = 1000
component = "exit"
basis = "measured"
source = "book"

[price."guest.insn"]
cycles = 0.5
component = "guest"
basis = "estimate"
source = "a guess for the test"

[free."vmentry"]
reason = "part of the exit round trip"
"""


def write(tmp_path, text, name="p.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_profile_parses_with_resolved_sources():
    p = parse_profile(VALID, "tiny.toml")
    assert p.name == "tiny"
    assert p.prices["exit"].cycles == 1000.0
    assert p.prices["exit"].source == "A Book, page 1"
    assert p.prices["exit"].source_ref == "book"
    assert p.prices["guest.insn"].source == "a guess for the test"
    assert p.free["vmentry"].reason
    assert p.nested is None and p.fit is None


def test_bundled_profiles_listed_and_load():
    names = list_profiles()
    assert "skylake-sp" in names and "pci-testdev-2013" in names
    for n in names:
        prof = load_profile(n)
        assert prof.name == n
        for price in prof.prices.values():
            assert price.component in COMPONENTS
            assert price.basis in BASES
            assert price.source.strip()


def test_bundled_estimates_say_so():
    """An estimate's source must say it is one (the brief: 'where a figure is an estimate, say
    "estimate" and why')."""
    for n in list_profiles():
        prof = load_profile(n)
        for price in list(prof.prices.values()) + list(
                prof.nested.prices.values() if prof.nested else []):
            if price.basis == "estimate":
                assert "estimate" in price.source.lower(), (n, price.key)
            if price.basis == "derived":
                assert "derived" in price.source.lower(), (n, price.key)


def test_user_path_loads(tmp_path):
    path = write(tmp_path, VALID, "mine.toml")
    assert load_profile(str(path)).name == "tiny"
    assert load_profile(path).origin == str(path)


def test_unknown_name_lists_bundled():
    with pytest.raises(ProfileError) as e:
        load_profile("no-such-cpu")
    assert "no-such-cpu" in str(e.value) and "skylake-sp" in str(e.value)
    assert isinstance(e.value, UsageError)


def test_missing_file_is_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "absent.toml")


# Each case: (description, text transformation, the field the message must name).
MALFORMED = [
    ("toml syntax", lambda t: t + "\n[price.\n", "not valid TOML"),
    ("unknown top-level table", lambda t: t + "\n[extra]\nx = 1\n", "(top level).extra"),
    ("missing [profile]", lambda t: t.replace("[profile]", "[profilex]"), "(top level).profilex"),
    ("missing name", lambda t: t.replace('name = "tiny"\n', ""), "profile.name"),
    ("bad name", lambda t: t.replace('name = "tiny"', 'name = "a b"'), "profile.name"),
    ("unknown [profile] field", lambda t: t.replace('cpu = "none"', 'cpu = "none"\nfoo = 1'),
     "profile.foo"),
    ("unknown price field", lambda t: t.replace("cycles = 1000", "cycles = 1000\ncycle = 2"),
     'price."exit".cycle'),
    ("cycles wrong type", lambda t: t.replace("cycles = 1000", 'cycles = "1000"'),
     'price."exit".cycles'),
    ("cycles a bool", lambda t: t.replace("cycles = 1000", "cycles = true"),
     'price."exit".cycles'),
    ("negative cycles", lambda t: t.replace("cycles = 1000", "cycles = -5"),
     'price."exit".cycles'),
    ("nan cycles", lambda t: t.replace("cycles = 1000", "cycles = nan"), 'price."exit".cycles'),
    ("inf cycles", lambda t: t.replace("cycles = 1000", "cycles = inf"), 'price."exit".cycles'),
    ("missing cycles", lambda t: t.replace("cycles = 1000\n", ""), 'price."exit".cycles'),
    ("missing source", lambda t: t.replace('source = "book"\n', ""), 'price."exit".source'),
    ("empty source", lambda t: t.replace('source = "book"', 'source = "  "'),
     'price."exit".source'),
    ("source names no [sources] entry", lambda t: t.replace('source = "book"', 'source = "bok"'),
     'price."exit".source'),
    ("source wrong type", lambda t: t.replace('source = "book"', "source = 3"),
     'price."exit".source'),
    ("unknown component", lambda t: t.replace('component = "exit"', 'component = "exits"'),
     'price."exit".component'),
    ("missing component", lambda t: t.replace('component = "exit"\n', ""),
     'price."exit".component'),
    ("bad basis", lambda t: t.replace('basis = "measured"', 'basis = "guess"'),
     'price."exit".basis'),
    ("missing basis", lambda t: t.replace('basis = "measured"\n', ""), 'price."exit".basis'),
    ("exact not a bool", lambda t: t.replace('basis = "measured"', 'basis = "measured"\nexact = 1'),
     'price."exit".exact'),
    ("bad key", lambda t: t.replace('[price."exit"]', '[price."exit..x"]'), 'price."exit..x"'),
    ("price entry not a table", lambda t: t + '\n[price]\n"x" = 3\n', 'price."x"'),
    ("free without reason", lambda t: t.replace('reason = "part of the exit round trip"', ""),
     'free."vmentry".reason'),
    ("free unknown field", lambda t: t.replace('reason = "part', 'why = 1\nreason = "part'),
     'free."vmentry".why'),
    ("key both priced and free", lambda t: t + '\n[free."exit"]\nreason = "x"\n', 'free."exit"'),
    ("sources entry not a string", lambda t: t.replace('book = "A Book, page 1"', "book = 1"),
     "sources.book"),
    ("nested true without [nested]", lambda t: t.replace('cpu = "none"', 'cpu = "none"\nnested = true'),
     "profile.nested"),
    ("nested without source", lambda t: t + '\n[nested]\ndescription = "x"\n', "nested.source"),
    ("nested scale unknown component",
     lambda t: t + '\n[nested]\ndescription = "x"\nsource = "book"\nscale = { exitt = 2 }\n',
     "nested.scale.exitt"),
    ("nested scale negative",
     lambda t: t + '\n[nested]\ndescription = "x"\nsource = "book"\nscale = { exit = -2 }\n',
     "nested.scale.exit"),
    ("nested price bad",
     lambda t: t + '\n[nested]\ndescription = "x"\nsource = "book"\n[nested.price."exit"]\n'
                   'cycles = 1\ncomponent = "exit"\nbasis = "derived"\n',
     'nested.price."exit".source'),
    ("fit free not a price key",
     lambda t: t + '\n[fit]\nfree = ["nope"]\n', "fit.free"),
    ("fit target without events",
     lambda t: t + '\n[fit]\nfree = ["exit"]\n[[fit.target]]\nroute = "r"\ncycles = 5\n'
                   'source = "book"\n', "fit.target[0].events"),
    ("fit target negative count",
     lambda t: t + '\n[fit]\nfree = ["exit"]\n[[fit.target]]\nroute = "r"\ncycles = 5\n'
                   'source = "book"\nevents = { "exit.X" = -1 }\n', 'fit.target[0].events."exit.X"'),
    ("fit bad weighting", lambda t: t + '\n[fit]\nweighting = "loud"\n', "fit.weighting"),
    ("no prices at all", lambda t: t.split("[price.")[0], "price"),
]


@pytest.mark.parametrize("what,mutate,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profile_names_file_and_field(tmp_path, what, mutate, field):
    path = write(tmp_path, mutate(VALID), "broken.toml")
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert field in msg, msg


def test_mutations_really_change_the_text():
    """Guard against a test case whose replacement silently did nothing."""
    for what, mutate, _ in MALFORMED:
        assert mutate(VALID) != VALID, what
