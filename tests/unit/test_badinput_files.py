"""Bad input files: cost profiles (``fastmmio.costs.profile.load_profile``) and route
catalogues (``fastmmio.routes.load_catalogue``) that are missing, unreadable, not text,
endless, not TOML, or TOML with wrong fields all give a FastmmioError naming the file,
never another exception or a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastmmio.costs.profile import load_profile
from fastmmio.errors import ProfileError, UsageError
from fastmmio.routes import load_catalogue

HEAD = '[profile]\nname = "x"\ndescription = "d"\ncpu = "c"\n'
PRICE = '[price."exit"]\ncycles = {cycles}\ncomponent = "{component}"\nbasis = "{basis}"\nsource = "{source}"\n'


def price(cycles="1", component="exit", basis="measured", source="a citation"):
    return HEAD + PRICE.format(cycles=cycles, component=component, basis=basis, source=source)


PROFILE_TEXTS = {
    "empty": ("", "missing [profile] table"),
    "not-toml": ("[profile\nname=", "not valid TOML"),
    "name-not-string": ('[profile]\nname = 5\n', "must be a string"),
    "no-prices": (HEAD, "at least one"),
    "cycles-nan": (price(cycles="nan"), "must be finite"),
    "cycles-inf": (price(cycles="inf"), "must be finite"),
    "cycles-negative": (price(cycles="-1"), "must not be negative"),
    "cycles-string": (price(cycles='"many"'), "cycles"),
    "unknown-component": (price(component="nope"), "component"),
    "unknown-basis": (price(basis="guess"), "basis"),
    "unknown-source-name": (price(source="nosuchsource"), "source"),
    "unknown-field": (price() + "color = 1\n", "unknown field"),
    "unknown-table": (price() + "[bogus]\nx = 1\n", "bogus"),
}


@pytest.mark.parametrize("name", list(PROFILE_TEXTS))
def test_bad_profile_file(tmp_path: Path, name: str):
    text, needle = PROFILE_TEXTS[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_profile_not_utf8(tmp_path: Path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        load_profile(path)


@pytest.mark.parametrize("path", ["/nonexistent-dir/p.toml", "/dev/null", "/dev/zero"])
def test_profile_path_that_is_not_a_profile_file(path: str):
    """Missing, or a device: /dev/zero would be read forever, so devices and FIFOs are
    refused before reading."""
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(path)


def test_profile_path_is_a_directory(tmp_path: Path):
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(str(tmp_path) + "/")


def test_profile_fifo_is_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "p.toml"
    os.mkfifo(fifo)
    with pytest.raises(ProfileError, match="not a regular file"):
        load_profile(fifo)


@pytest.mark.parametrize("name", ["no-such-profile", "", "../../etc/passwd-not-toml"])
def test_unknown_profile_name(name: str):
    with pytest.raises(ProfileError):
        load_profile(name)


CATALOGUE_TEXTS = {
    "empty": ("", "no [[route]] tables"),
    "not-toml": ("[[route]\n", "at the end of an array declaration"),
    "missing-name": ('[[route]]\naccess = { kind = "none" }\nexpect = {}\n', "missing name"),
    "bad-kind": ('[[route]]\nname = "r"\naccess = { kind = "jump" }\nexpect = {}\n', "unknown kind"),
    "bad-width": ('[[route]]\nname = "r"\naccess = { kind = "out", width = 3, target = 1 }\nexpect = {}\n', "width"),
    "bad-ioeventfd-length": (
        '[[route]]\nname = "r"\naccess = { kind = "out", width = 1, target = 1 }\n'
        'ioeventfd = { length = 3 }\nexpect = {}\n', "length must be one of"),
    "unknown-symbol": ('[[route]]\nname = "r"\naccess = { kind = "out", width = 1, target = "NOPE" }\nexpect = {}\n',
                       "unknown value"),
}


@pytest.mark.parametrize("name", list(CATALOGUE_TEXTS))
def test_bad_route_catalogue(tmp_path: Path, name: str):
    text, needle = CATALOGUE_TEXTS[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_catalogue(str(path))
    assert needle in str(info.value)


def test_route_catalogue_not_utf8_or_a_device(tmp_path: Path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UsageError, match="not UTF-8 text"):
        load_catalogue(str(path))
    with pytest.raises(UsageError, match="not a regular file"):
        load_catalogue("/dev/zero")
    with pytest.raises(UsageError, match="cannot read route catalogue"):
        load_catalogue("/nonexistent-dir/routes.toml")
