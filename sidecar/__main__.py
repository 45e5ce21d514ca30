"""``python -m sidecar`` is the ``llm-sidecar`` command."""

from sidecar.cli import main

raise SystemExit(main())
