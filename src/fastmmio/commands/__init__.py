"""Subcommands of ``fastmmio``: one command tree.

Each module listed in :data:`COMMAND_MODULES` defines ``register(subparsers)``, which adds its
parser with ``subparsers.add_parser(NAME, ...)`` and sets ``func`` (called with the parsed
namespace, returning an exit status). A command with subcommands of its own (``fastmmio fuzz
hostile|soak|diff``) adds a nested ``add_subparsers`` the same way. Adding a command is one
module and one line here; :mod:`fastmmio.cli` does the rest (parsing, the one error style
``fastmmio COMMAND: message``, exit statuses, Ctrl-C and SIGTERM, a closed or full stdout).
A module that is listed but not importable (``ModuleNotFoundError`` for the module itself) is
left out of the tree, so a command can be listed before it lands.
"""

# Order here is the order `fastmmio --help` lists them.
COMMAND_MODULES = (
    "fastmmio.commands.compare",
    "fastmmio.commands.bench",
    "fastmmio.commands.explain",
    "fastmmio.commands.report",
    "fastmmio.commands.diff",
    "fastmmio.commands.sweep",
    "fastmmio.commands.calibrate",
    "fastmmio.commands.profile",
    "fastmmio.commands.fuzz",
)
