"""Run the safepg command line: ``python -m safepg``."""

from ._cli import main

raise SystemExit(main())
