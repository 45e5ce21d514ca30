"""The demo pod's mock LLM upstream: llm-sidecar's built-in mock, served on 127.0.0.1.

OpenAI- and Anthropic-shaped answers (JSON and streams, with failures), no API key and no
network; see ``sidecar.mock_upstream``. Settings come from the environment:
``MOCK_PORT`` (default 8081), ``MOCK_FAILURE_RATE`` (default 0.04), ``MOCK_SEED`` (default 7).
"""

from __future__ import annotations

import os

from aiohttp import web

from sidecar.mock_upstream import create_mock_app


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    app = create_mock_app(
        seed=int(os.environ.get("MOCK_SEED", "7")),
        failure_rate=float(os.environ.get("MOCK_FAILURE_RATE", "0.04")),
    )
    port = int(os.environ.get("MOCK_PORT", "8081"))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
