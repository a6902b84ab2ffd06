"""The package layering of docs/architecture.md, enforced on the source: every ``import`` and
``from ... import`` statement anywhere in a module (top level, inside functions, under
``TYPE_CHECKING``) is an arrow, read with :mod:`ast` without importing anything.

* The machine layers (``x86/``, ``sim/vmx/``, ``sim/kvm/``, ``real/``, and the shared
  ``kvmabi``, ``image``, ``machine``, ``deadline``) never import the analysis, report or CLI
  layers (``compare``, ``verdict``, ``review``, ``explain``, ``report``, ``commands``, ``cli``).
* Nothing but ``cli.py`` imports ``commands/`` (the sub-commands import their siblings).
* ``x86/`` stands on nothing but ``errors``; ``kvmabi`` on nothing at all.
* ``sim/`` and ``real/`` never import ``guest/`` (they load a :class:`fastmmio.image.GuestImage`,
  they do not build one), ``guest/`` never imports ``sim/`` or ``real/``, and ``sim/vmx/``
  (the processor) never imports ``sim/kvm/`` (the hypervisor on top of it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "fastmmio"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every fastmmio module (or module.name) ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "fastmmio" or m.startswith("fastmmio.")}


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


MACHINE_LAYERS = ("fastmmio.x86", "fastmmio.sim.vmx", "fastmmio.sim.svm", "fastmmio.sim.kvm", "fastmmio.real",
                  "fastmmio.kvmabi", "fastmmio.image", "fastmmio.machine", "fastmmio.deadline")
UPPER_LAYERS = ("fastmmio.compare", "fastmmio.verdict", "fastmmio.review", "fastmmio.explain",
                "fastmmio.report", "fastmmio.commands", "fastmmio.cli", "fastmmio.fuzz.cli",
                "fastmmio.__main__")


def arrows(sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, deps in GRAPH.items() if within(m, *sources)
                  for t in deps if within(t, *targets))


def test_the_walk_sees_imports_at_every_level():
    """Not vacuous: a top-level, a function-level and a TYPE_CHECKING import are all found."""
    assert "fastmmio.commands" in GRAPH["fastmmio.cli"]
    assert "fastmmio.real.host.unsupported_reason" in GRAPH["fastmmio.compare.run"]  # in a function
    assert "fastmmio.sim.kvm.handlers.KvmVcpu" in GRAPH["fastmmio.sim.kvm.variants"]  # TYPE_CHECKING
    for layer in MACHINE_LAYERS + UPPER_LAYERS:
        assert any(within(m, layer) for m in GRAPH), f"no module in {layer}"


def test_machine_layers_never_import_analysis_report_or_cli():
    assert arrows(MACHINE_LAYERS, UPPER_LAYERS) == []


def test_only_the_cli_imports_the_commands():
    bad = sorted(f"{m} -> {t}" for m, deps in GRAPH.items()
                 if not within(m, "fastmmio.commands") and m != "fastmmio.cli"
                 for t in deps if within(t, "fastmmio.commands"))
    assert bad == []


def test_x86_stands_on_errors_only_and_kvmabi_on_nothing():
    assert [a for a in arrows(("fastmmio.x86",), ("fastmmio",))
            if not within(a.split(" -> ")[1], "fastmmio.x86", "fastmmio.errors")] == []
    assert arrows(("fastmmio.kvmabi",), ("fastmmio",)) == []


@pytest.mark.parametrize("sources,targets", [
    (("fastmmio.sim", "fastmmio.real"), ("fastmmio.guest",)),
    (("fastmmio.guest",), ("fastmmio.sim", "fastmmio.real")),
    (("fastmmio.sim.vmx", "fastmmio.sim.svm"),
     ("fastmmio.sim.kvm", "fastmmio.sim.backend", "fastmmio.sim.cpu")),
    (("fastmmio.x86", "fastmmio.kvmabi", "fastmmio.image", "fastmmio.machine"),
     ("fastmmio.sim", "fastmmio.real", "fastmmio.guest")),
])
def test_data_flows_one_way(sources, targets):
    assert arrows(sources, targets) == []


def test_fanout_stands_on_errors_only():
    """fastmmio.fanout is shared by the run, judge and CLI layers: it may import nothing of the
    project above ``errors`` (the tasks it runs are passed in by the callers)."""
    assert [a for a in arrows(("fastmmio.fanout",), ("fastmmio",))
            if not within(a.split(" -> ")[1], "fastmmio.errors")] == []
    assert "fastmmio.fanout" in GRAPH
