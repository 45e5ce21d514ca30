"""Test harness: a real sidecar on 127.0.0.1 with a record collector and a fresh registry."""

from __future__ import annotations

import asyncio
import tempfile
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar import config as config_mod
from sidecar.alerting import AlertingSettings
from sidecar.app import Sidecar
from sidecar.metrics import iter_samples
from sidecar.model import CallRecord
from sidecar.sinks import QueueSink


class Collect(QueueSink):
    """Collects every record the pipeline hands out."""

    name = "collect"

    def __init__(self) -> None:
        super().__init__(maxsize=100_000)
        self.records: list[CallRecord] = []
        self.arrived = asyncio.Event()
        #: The other queue sinks of the pipeline: :meth:`wait_for` also waits until they
        #: handled what they were offered, so a test reads metrics after the last record.
        self.peers: list[QueueSink] = []

    async def handle(self, records: list[CallRecord]) -> None:
        self.records.extend(records)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[CallRecord]:
        """Wait until ``count`` records arrived (estimates run in a thread, so this may take a moment)."""
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                self.arrived.clear()
                await self.arrived.wait()
            for peer in self.peers:
                await peer.drained()
        return self.records


async def close_held(server: asyncio.Server | None, writers: list[asyncio.StreamWriter]) -> None:
    """Close a test's never-answering server and every connection it accepted.

    The server stops accepting first; then the handlers of connections accepted just before
    get to run (and note their writers), and every connection is aborted. A sidecar's exporter
    may still be retrying from its shutdown thread when the test ends, and a connection left
    open here would be garbage-collected during a later test: an unraisable ResourceWarning
    that fails that one.
    """
    if server is not None:
        server.close()
        await asyncio.sleep(0.1)
    for writer in writers:
        writer.transport.abort()
    await asyncio.sleep(0.01)  # the handlers see their connection end and return
    if server is not None:
        await server.wait_closed()


def make_config(upstreams_yaml: str, extra: str = "", tmp: Path | None = None) -> config_mod.Config:
    """A config with ephemeral ports and the given upstream list (YAML, indented under ``upstreams:``)."""
    text = (
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "upstreams:\n"
        + textwrap.indent(textwrap.dedent(upstreams_yaml).strip("\n"), "  ")
        + "\n"
        + textwrap.dedent(extra)
    )
    if "data_dir:" not in text:
        text += f"data_dir: {tmp if tmp is not None else tempfile.mkdtemp(prefix='sidecar-test-')}\n"
    return config_mod.load(text, "test.yaml")


@asynccontextmanager
async def running_sidecar(
    cfg: config_mod.Config, alerting: AlertingSettings | None = None
) -> AsyncIterator[tuple[Sidecar, Collect]]:
    """A started sidecar and its record collector; stopped (drained) on exit."""
    collect = Collect()
    sidecar = Sidecar(cfg, registry=CollectorRegistry(), extra_sinks=[collect], alerting=alerting)
    await sidecar.start()
    assert sidecar.pipeline is not None
    collect.peers = [s for s in sidecar.pipeline.sinks if isinstance(s, QueueSink) and s is not collect]
    try:
        yield sidecar, collect
    finally:
        await sidecar.stop()


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for sample_labels, value in iter_samples(sidecar.registry, name):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total
