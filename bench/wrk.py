"""The load generator: wrk (Debian's package) with a Lua script, or :mod:`bench.loadgen`.

The Lua script cycles through the pre-rendered request mix (:mod:`bench.payloads`) and
prints one ``BENCHJSON {...}`` line from wrk's ``done`` hook, in the same form as
``python -m bench.loadgen``. wrk counts answers with status >= 400 as ``errors.status``.
Nothing is installed at run time: wrk is used when it is on the ``PATH``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import rendered

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "errors_status": %d, "errors_socket": %d, ' ..
    '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def _lua_string(data: bytes) -> str:
    out = []
    for b in data:
        ch = chr(b)
        if ch in '"\\' or not 32 <= b < 127:
            out.append(f"\\{b:03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def lua_script(requests: Sequence[bytes]) -> str:
    """A wrk script sending ``requests`` in turn on every connection."""
    items = ",\n  ".join(_lua_string(r) for r in requests)
    return (
        f"local reqs = {{\n  {items}\n}}\n"
        "local n = #reqs\nlocal i = 0\n"
        "request = function()\n  i = i % n + 1\n  return reqs[i]\nend\n" + _DONE
    )


def wrk_version() -> str | None:
    """``wrk <version>`` when wrk is installed, else None."""
    path = shutil.which("wrk")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


def command(
    tool: str, host: str, port: int, stream: bool, connections: int, duration: float, workdir: Path
) -> list[str]:
    """The command line of one bounded load run with ``tool`` (``wrk`` or ``python``)."""
    shape = "stream" if stream else "json"
    if tool == "python":
        return [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--target",
            f"{host}:{port}",
            "--shape",
            shape,
            "-c",
            str(connections),
            "-d",
            f"{duration:g}",
        ]
    script = workdir / f"wrk-{shape}-{port}.lua"
    if not script.exists():
        script.write_text(lua_script(rendered(stream, f"{host}:{port}")))
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{host}:{port}/",
    ]


def parse(output: str) -> dict[str, float]:
    """The figures of the ``BENCHJSON`` line in a load run's output."""
    for line in output.splitlines():
        if line.startswith("BENCHJSON "):
            figures: dict[str, float] = json.loads(line[len("BENCHJSON ") :])
            return figures
    raise ValueError(f"no BENCHJSON line in the load generator's output:\n{output[-2000:]}")
