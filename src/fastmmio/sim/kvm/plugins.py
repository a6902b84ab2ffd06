"""The user's own KVM variants: a Python file (``--variant-file PATH.py``) or an installed
plug-in (the ``fastmmio.variants`` entry-point group), registered in
:data:`fastmmio.sim.kvm.variants.VARIANTS` the way the bundled variants are
(:func:`~fastmmio.sim.kvm.variants.register_variant`). docs/variants.md describes the API
and walks through examples/variants/rfc_writes_only.py.

A file is read and run as a module under a private name (its text can travel to a Dask
worker on another host: :class:`VariantSource`); every
:class:`~fastmmio.sim.kvm.variants.Variant` subclass it *defines* (not one it imports) and that
sets its own ``name`` is registered. An entry point names either such a class
(``my-variant = "mypkg.kvm:MyVariant"``) or a module, whose classes are taken as a file's are.
Every problem (a missing or unreadable file, a syntax error, an exception while importing, no
variant in it, a name the registry already has) is one :class:`~fastmmio.errors.UsageError`
line naming the file or the entry point.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastmmio.errors import FastmmioError, UsageError
from fastmmio.sim.kvm.variants import ALL_VARIANTS, Variant, register_variant

ENTRY_POINT_GROUP = "fastmmio.variants"


def variants_defined_in(module: types.ModuleType) -> list[type[Variant]]:
    """The :class:`Variant` subclasses ``module`` defines itself with a ``name`` of their
    own, in the order they appear (imported classes and nameless base classes are left)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Variant)
            and obj.__module__ == module.__name__ and "name" in obj.__dict__]


def _register_all(classes: list[type[Variant]], origin: str) -> list[str]:
    names = [c.__dict__["name"] for c in classes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"{origin}: two variant classes are both named {dup!r}")
    for cls in classes:
        register_variant(cls, origin)
    return names


def load_variant_file(path: str | Path) -> list[str]:
    """Import the Python file at ``path`` and register the variants it defines; their names."""
    p = Path(path)
    origin = f"--variant-file {path}"
    if p.suffix != ".py":
        raise UsageError(f"{origin}: not a Python file (a .py module defining Variant subclasses)")
    if not p.is_file():
        why = "no such file" if not p.exists() else "not a regular file"
        raise UsageError(f"{origin}: {why}")
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{origin}: cannot be read: {exc}") from None
    return load_variant_source(VariantSource(source, origin, str(p.resolve())))


@dataclass(frozen=True)
class VariantSource:
    """A ``--variant-file`` as text (what a Dask worker on any host is given to register the
    same variants: :func:`load_variant_source`). ``filename``: the file's resolved path, for
    tracebacks and the private module name."""

    source: str
    origin: str
    filename: str


def load_variant_source(vs: VariantSource) -> list[str]:
    """Run a variant file's text as a module under a private name and register the variants
    it defines; their names. Each such class keeps its :class:`VariantSource`
    (:func:`variant_sources`)."""
    origin = vs.origin
    module_name = "fastmmio_user_variants_" + hashlib.sha1(vs.filename.encode()).hexdigest()[:12]
    module = types.ModuleType(module_name)
    module.__file__ = vs.filename
    sys.modules[module_name] = module  # classes and dataclasses look their module up
    try:
        exec(compile(vs.source, vs.filename, "exec"), module.__dict__)  # noqa: S102 - the user's file
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise UsageError(f"{origin}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except FastmmioError as exc:
        sys.modules.pop(module_name, None)
        raise UsageError(f"{origin}: {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: say what it raised
        sys.modules.pop(module_name, None)
        raise UsageError(f"{origin}: importing it raised {type(exc).__name__}: {exc}") from None
    classes = variants_defined_in(module)
    if not classes:
        raise UsageError(f"{origin}: defines no variant (a subclass of "
                         "fastmmio.sim.kvm.variants.Variant with its own name = '...')")
    for cls in classes:
        cls._variant_source = vs  # type: ignore[attr-defined]
    return _register_all(classes, origin)


def variant_sources(names: Iterable[str]) -> tuple[VariantSource, ...]:
    """The files (as text) of the registered variants among ``names`` that came from a
    ``--variant-file``, each once, in order; bundled and installed variants need none."""
    found: dict[str, VariantSource] = {}
    for name in names:
        vs = ALL_VARIANTS[name].__dict__.get("_variant_source") if name in ALL_VARIANTS else None
        if vs is not None:
            found.setdefault(vs.filename, vs)
    return tuple(found.values())


def load_installed_variants() -> list[str]:
    """Register the variants of every installed ``fastmmio.variants`` entry point; their
    names."""
    from importlib.metadata import entry_points

    names: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"variant plug-in {ep.name} ({ep.value})"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plug-in's code
            raise UsageError(f"{origin}: cannot load it: {type(exc).__name__}: {exc}") from None
        if isinstance(obj, types.ModuleType):
            classes = variants_defined_in(obj)
            if not classes:
                raise UsageError(f"{origin}: the module defines no variant")
        elif isinstance(obj, type) and issubclass(obj, Variant):
            classes = [obj]
        else:
            raise UsageError(f"{origin}: names neither a Variant subclass nor a module")
        names += _register_all(classes, origin)
    return names
