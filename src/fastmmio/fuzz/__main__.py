"""``python -m fastmmio.fuzz``: see :mod:`fastmmio.fuzz.cli`."""

from fastmmio.fuzz.cli import main

raise SystemExit(main())
