"""The demo application: it calls an LLM API through the sidecar, as any application would.

The only thing that makes it a sidecar user is its base URL: ``LLM_BASE_URL``
(``http://127.0.0.1:8080``) instead of ``https://api.openai.com``. It sends the mix of
calls real SDKs send, from several tenants (the ``x-tenant-id`` header): OpenAI chat
completions (JSON and streams, some without usage), Responses, embeddings, Anthropic
messages, calls to a model with no price, and a few streams it abandons mid-way, so that
every panel of the dashboards has something to show. Standard library only.

Environment: ``LLM_BASE_URL``, ``DEMO_REQUESTS_PER_SECOND`` (default 2), ``DEMO_TENANTS``
(comma-separated, default ``acme,globex,initech``), ``DEMO_WORKERS`` (default 4),
``DEMO_DURATION_SECONDS`` (default 0: until SIGTERM), ``DEMO_SEED``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

WORDS = ("alpha", "beta", "gamma", "delta", "summarise", "the", "quarterly", "report", "please")


def pick_call(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, str], bool]:
    """One call: (path, JSON body, extra headers, abandon mid-stream)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
    messages = [{"role": "user", "content": prompt}]
    roll = rng.random()
    if roll < 0.40:
        model = rng.choice(("gpt-4o-mini", "gpt-4o", "gpt-5-mini"))
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": rng.randint(20, 200)}
        if rng.random() < 0.6:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body, {}, bool(body.get("stream")) and rng.random() < 0.05
    if roll < 0.50:
        body = {"model": "gpt-5-mini", "input": prompt, "stream": rng.random() < 0.5}
        return "/v1/responses", body, {}, False
    if roll < 0.58:
        return "/v1/embeddings", {"model": "text-embedding-3-small", "input": [prompt]}, {}, False
    if roll < 0.62:
        # A model missing from the price table: counted as unpriced, never as free.
        return "/v1/chat/completions", {"model": "acme-finetune-v2", "messages": messages}, {}, False
    model = rng.choice(("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022", "claude-haiku-4-5"))
    stream = rng.random() < 0.6
    body = {"model": model, "max_tokens": rng.randint(20, 300), "messages": messages, "stream": stream}
    headers = {"anthropic-version": "2023-06-01"}
    return "/anthropic/v1/messages", body, headers, stream and rng.random() < 0.05


def call(base: str, tenant: str, rng: random.Random) -> int:
    """Send one call through the sidecar; its HTTP status (0 when it could not be sent)."""
    path, body, headers, abandon = pick_call(rng)
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-tenant-id": tenant, **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if abandon:
                response.read(64)  # hang up mid-stream, like a user closing the tab
            else:
                response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
        return int(exc.code)
    except (OSError, TimeoutError):
        return 0


def worker(base: str, tenants: list[str], interval: float, seed: int, stop: threading.Event) -> None:
    """Send calls every ``interval`` seconds until ``stop`` is set."""
    rng = random.Random(seed)
    weights = [len(tenants) - i for i in range(len(tenants))]  # the first tenant is the busiest
    next_at = time.monotonic() + rng.random() * interval
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += interval
        call(base, rng.choices(tenants, weights=weights)[0], rng)


def main() -> int:
    """Run the workers until SIGTERM (or ``DEMO_DURATION_SECONDS``)."""
    base = os.environ.get("LLM_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    rate = float(os.environ.get("DEMO_REQUESTS_PER_SECOND", "2"))
    tenants = [t for t in os.environ.get("DEMO_TENANTS", "acme,globex,initech").split(",") if t]
    workers = max(1, int(os.environ.get("DEMO_WORKERS", "4")))
    duration = float(os.environ.get("DEMO_DURATION_SECONDS", "0"))
    seed = int(os.environ.get("DEMO_SEED", "1"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stdout.write(f"demo app: {workers} workers, {rate:g} calls/s through {base}\n")
    sys.stdout.flush()
    threads = [
        threading.Thread(target=worker, args=(base, tenants, workers / rate, seed + i, stop), daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    stop.wait(duration if duration > 0 else None)
    stop.set()
    for thread in threads:
        thread.join(timeout=65)
    return 0


if __name__ == "__main__":
    sys.exit(main())
