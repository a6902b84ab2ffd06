"""``--routes-file FILE.toml`` (fastmmio.routes.user_routes): the user's routes are added to the
bundled catalogue for bench, compare, explain and sweep, validated as the bundled catalogue is;
every bad file is one line and exit status 2; the catalogue is as it was after the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_run import one_line, run_cli

from fastmmio.errors import UsageError
from fastmmio.routes import get_route, load_catalogue, route_names, user_routes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "routes" / "mmio-virtio-notify.toml"


def test_user_routes_are_added_and_removed_again():
    bundled = route_names()
    with user_routes(EXAMPLE) as added:
        assert [r.name for r in added] == ["mmio-virtio-notify", "mmio-virtio-notify-other-queue"]
        assert route_names() == bundled + [r.name for r in added]
        r = get_route("mmio-virtio-notify")
        assert r.ioeventfd.length == 2 and r.ioeventfd.datamatch == 1 and r.access.value == 1
    assert route_names() == bundled
    with pytest.raises(UsageError, match="unknown route 'mmio-virtio-notify'"):
        get_route("mmio-virtio-notify")


def test_explain_runs_a_user_route(capsys):
    status, out, err = run_cli(["explain", "mmio-virtio-notify", "--routes-file", str(EXAMPLE),
                                "--json", "-"], capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["route"] == "mmio-virtio-notify"
    events = {s["event"] for s in doc["steps"] if s["event"]}
    # length 2: not on KVM_FAST_MMIO_BUS, so the store is emulated and then signals
    assert "kvm.emulate" in events and "kvm.eventfd.signal" in events
    assert "mmio-virtio-notify" not in route_names()


def test_compare_and_sweep_run_user_routes(tmp_path, capsys):
    status, _, err = run_cli(["compare", "--no-kvm", "--no-review", "--variants", "upstream",
                              "-n", "32", "--routes-file", str(EXAMPLE), "--out",
                              str(tmp_path / "c"), "mmio-virtio-notify",
                              "mmio-virtio-notify-other-queue"], capsys)
    assert status == 0, err
    text = (tmp_path / "c" / "results.json").read_text()
    assert "mmio-virtio-notify-other-queue" in text
    status, _, err = run_cli(["sweep", "--param", "vpid", "--values", "on,off", "--routes",
                              "mmio-virtio-notify", "--variants", "upstream", "-n", "16",
                              "--routes-file", str(EXAMPLE), "--out", str(tmp_path / "s")],
                             capsys)
    assert status == 0, err
    assert "mmio-virtio-notify" in "".join(p.read_text() for p in (tmp_path / "s").glob("*.csv"))


def test_compare_without_route_names_runs_the_whole_merged_catalogue(tmp_path, capsys,
                                                                     monkeypatch):
    import fastmmio.commands.compare as compare_cmd
    from fastmmio.compare.run import _select_routes

    seen = {}

    def stop(options, *_a, **_k):
        seen["routes"] = [r.name for r in _select_routes(options.routes)]
        raise UsageError("stopped by the test")

    monkeypatch.setattr(compare_cmd, "run_compare", stop)
    status, _, err = run_cli(["compare", "--no-kvm", "--routes-file", str(EXAMPLE), "--out",
                              str(tmp_path / "c")], capsys)
    assert status == 2 and "stopped by the test" in err
    assert seen["routes"][-2:] == ["mmio-virtio-notify", "mmio-virtio-notify-other-queue"]
    assert len(seen["routes"]) == len(load_catalogue()) + 2


def test_bench_list_shows_user_routes(capsys):
    status, out, err = run_cli(["bench", "--list", "--routes-file", str(EXAMPLE)], capsys)
    assert status == 0, err
    assert "mmio-virtio-notify-other-queue" in out and "pio-virtio-notify" in out


ROUTE = ('[[route]]\nname = "{name}"\ndescription = "d"\n'
         'access = {{ kind = "write", width = 1, target = "DOORBELL_GPA", value = 0 }}\n'
         'ioeventfd = {{ length = {length} }}\nexpect = {{ eventfd = 1, user_exits = 0 }}\n{extra}')

BAD_FILES = {
    "not-toml": ("[[route]\nname=", "Expected"),
    "no-routes": ("x = 1\n", "no [[route]] tables"),
    "unknown-key": (ROUTE.format(name="a", length=0, extra="colour = 'red'\n"),
                    "route a: unknown key(s) colour"),
    "bad-length": (ROUTE.format(name="a", length=3, extra=""),
                   "route a.ioeventfd: length must be one of (0, 1, 2, 4, 8)"),
    "clash": (ROUTE.format(name="mmio-eventfd-len0", length=0, extra=""),
              "route mmio-eventfd-len0 is already in the bundled catalogue"),
    "twice": (ROUTE.format(name="a", length=0, extra="") + ROUTE.format(name="a", length=0, extra=""),
              "route a defined twice"),
    "unknown-variant": (ROUTE.format(name="a", length=0, extra='variant = "rfc-2051"\n'),
                        "route a needs variant 'rfc-2051', which is not known (did you mean 'rfc-2015'"),
}


@pytest.mark.parametrize("command", [
    ["explain", "pio-eventfd-len1"],
    ["bench", "pio-eventfd-len1"],
    ["compare", "--no-kvm", "pio-eventfd-len1"],
    ["sweep", "--param", "vpid", "--values", "on"],
])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_routes_file_is_one_line(tmp_path, capsys, command, case):
    text, why = BAD_FILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    bundled = route_names()
    extra = ["--out", str(tmp_path / "o")] if command[0] in ("compare", "sweep") else []
    status, _, err = run_cli(command + ["--routes-file", str(path)] + extra, capsys)
    assert status == 2
    line = one_line(err)
    assert why in line, line
    assert route_names() == bundled
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path,why", [("/nonexistent/r.toml", "No such file"),
                                      ("/dev/zero", "not a regular file"),
                                      ("/", "Is a directory")])
def test_an_unreadable_routes_file_is_one_line(capsys, path, why):
    status, _, err = run_cli(["explain", "pio-eventfd-len1", "--routes-file", path], capsys)
    assert status == 2 and why in one_line(err)


def test_a_user_route_may_need_a_user_variant(tmp_path, capsys):
    """A route written for a variant of --variant-file is accepted when that file is given,
    and is n/a under the other variants."""
    path = tmp_path / "r.toml"
    path.write_text(ROUTE.format(name="mine", length=0,
                                 extra='variant = "rfc-writes-only"\n').replace(
        'target = "DOORBELL_GPA"', 'target = "RO_BASE"'))
    variant = ROOT / "examples" / "variants" / "rfc_writes_only.py"
    status, out, err = run_cli(["explain", "mine", "--routes-file", str(path),
                                "--variant-file", str(variant), "--variant",
                                "rfc-writes-only", "--json", "-"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["explain", "mine", "--routes-file", str(path)], capsys)
    assert status == 2 and "needs variant 'rfc-writes-only'" in one_line(err)
