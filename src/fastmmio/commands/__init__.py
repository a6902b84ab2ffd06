"""Subcommands. Each module defines ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit status)."""

# Order here is the order `fastmmio --help` lists them.
COMMAND_MODULES = (
    "fastmmio.commands.compare",
    "fastmmio.commands.bench",
    "fastmmio.commands.explain",
    "fastmmio.commands.sweep",
    "fastmmio.commands.calibrate",
)
