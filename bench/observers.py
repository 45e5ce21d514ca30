"""The CPU a stream observer costs per stream, on the benchmark's own streams, in process.

``python -m bench.observers [--streams 3000]`` feeds the OpenAI and Anthropic streams the
mock upstream sends (:mod:`bench.payloads`: 20 content chunks plus usage), one event per
chunk as the mock sends them, through a fresh observer each, closes it and reads its
result, and prints the microseconds per stream (wall time of a tight loop: run it on a
quiet core, e.g. under ``taskset``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from bench import payloads
from sidecar.providers import SHAPES
from sidecar.providers.base import StreamObserver


def per_stream(events: list[bytes], make: Callable[[], StreamObserver], streams: int) -> float:
    """Microseconds per stream: feed every event, close, read the result."""
    started = time.perf_counter()
    for _ in range(streams):
        observer = make()
        for event in events:
            observer.feed(event)
        observer.close()
        observer.result()
    return (time.perf_counter() - started) / streams * 1e6


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.observers``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=3000, help="streams per shape (max 100000)")
    args = parser.parse_args(argv)
    streams = max(1, min(args.streams, 100_000))
    cases = (
        ("openai chat", payloads.openai_events(), SHAPES[("openai", "chat")]),
        ("anthropic messages", payloads.anthropic_events(), SHAPES[("anthropic", "messages")]),
    )
    for name, events, shape in cases:
        make = partial(shape.stream_observer, False)
        per_stream(events, make, min(streams, 200))  # warm up
        us = per_stream(events, make, streams)
        print(f"{name:<20} {len(events):>3} events  {us:8.1f} us per stream")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
