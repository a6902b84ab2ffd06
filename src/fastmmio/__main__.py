from fastmmio.cli import main

raise SystemExit(main())
