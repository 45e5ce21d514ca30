"""The Helm chart's demo pod as local processes, scraped by a real Prometheus, all on 127.0.0.1.

Used by ``tests/test_dashboards.py`` (every dashboard query against real data) and by
``dashboards/render.py`` (the pictures in the README). :func:`demo_stack`:

1. renders the chart with ``helm template``: the repository's rule files in-process and a
   PrometheusRule exported from them (``llm-sidecar rules export``), so notification is off;
2. starts the pod's containers from the rendered pod spec: the mock LLM upstream
   (``helm/llm-sidecar/files/mock_upstream.py``) and the sidecar (``python -m sidecar run``
   with the rendered args and config, the listeners moved to free loopback ports);
3. starts Prometheus (Debian's ``prometheus``) with a temporary config: scrape every
   second, the exported rules loaded;
4. runs the demo application (``files/demo_app.py``) for ``traffic_seconds``, adds a few
   streams the upstream cuts short (so estimated tokens and ``stream_interrupted`` appear
   for sure), and waits until Prometheus has scraped the final counts.

Every process is stopped by its own pid when the context exits. Needs ``helm`` (``.tools/bin``
or PATH) and ``prometheus``; raises :class:`RuntimeError` when something does not start.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "llm-sidecar"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str, local: Path | None = None) -> str:
    """The path of a required tool."""
    if local is not None and local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (.ci/run installs it)")
    return found


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


class Processes:
    """Started processes, each stopped by its own pid (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} not up after {seconds}s:\n{log.read_text()[-3000:]}")


@dataclass
class Stack:
    """A running demo stack."""

    prometheus: str  # base URL
    metrics_text: str  # the sidecar's /metrics after the traffic
    logs: Path
    started: float  # epoch seconds when the traffic started
    finished: float  # epoch seconds when Prometheus had the final counts

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """A call to Prometheus's HTTP API (errors come back as their JSON body)."""
        url = f"{self.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_get(url, timeout=10)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            exc.close()
        data: dict[str, Any] = json.loads(body)
        return data


def render_demo_pod(tmp: Path, mock_port: int) -> tuple[dict[str, Any], dict[str, str], Path]:
    """Render the chart's demo with the repository's rules: (pod spec, ConfigMap data, rule export)."""
    helm = tool("helm", REPO / ".tools" / "bin" / "helm")
    export = tmp / "prometheusrule.yaml"
    with export.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "sidecar", "rules", "export", "--format", "prometheus-operator", "rules/"],
            cwd=REPO,
            stdout=out,
            check=True,
            timeout=60,
        )
    rule_args = []
    for path in sorted((REPO / "rules").glob("*.yaml")):
        rule_args += ["--set-file", f"rules.{path.name.replace('.', chr(92) + '.')}={path}"]
    proc = subprocess.run(
        [
            helm,
            "template",
            "demo",
            str(CHART),
            "--set",
            f"demo.mockUpstreamPort={mock_port},demo.mockFailureRate=0.15,prometheusRule.enabled=true",
            "--set-file",
            f"prometheusRule.exported={export}",
            *rule_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{proc.stderr}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])
    return deployment["spec"]["template"]["spec"], config_map["data"], export


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def cut_stream(proxy_port: int, tenant: str) -> None:
    """A chat stream the mock upstream cuts mid-way (header ``x-mock-failure: cut``)."""
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hello " * 50}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-tenant-id": tenant, "x-mock-failure": "cut"},
        method="POST",
    )
    # The stream ends abruptly: that is the point.
    with (
        contextlib.suppress(OSError, http.client.HTTPException),
        urllib.request.urlopen(request, timeout=30) as response,
    ):
        response.read()


@contextlib.contextmanager
def demo_stack(
    tmp: Path, traffic_seconds: float = 6.0, rate: float = 40.0, workers: int = 12
) -> Iterator[Stack]:
    """Start everything, send the traffic, yield the :class:`Stack`; stop everything on exit."""
    logs = tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mock_port, proxy_port, admin_port, prom_port = free_port(), free_port(), free_port(), free_port()
    spec, config_data, export = render_demo_pod(tmp, mock_port)

    # The ConfigMap as the kubelet would mount it, under tmp instead of /etc/llm-sidecar.
    etc = tmp / "etc"
    for key, text in config_data.items():
        target = etc / ("rules/" + key.removeprefix("rules.") if key.startswith("rules.") else key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace("/etc/llm-sidecar", str(etc)))
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        base_env["TIKTOKEN_CACHE_DIR"] = os.environ["TIKTOKEN_CACHE_DIR"]
    containers = {c["name"]: c for c in spec["containers"] + spec.get("initContainers", [])}
    scripts = CHART / "files"

    procs = Processes(logs)
    try:
        mock = containers["mock-upstream"]
        mock_proc, mock_log = procs.start(
            "mock-upstream",
            [sys.executable, str(scripts / Path(mock["command"][1]).name)],
            {**base_env, **container_env(mock)},
        )
        sidecar = containers["llm-sidecar"]
        args = [a.replace("/etc/llm-sidecar", str(etc)) for a in sidecar["args"]]
        overrides = {
            "--listen": f"127.0.0.1:{proxy_port}",
            "--admin-listen": f"127.0.0.1:{admin_port}",
            "--data-dir": str(tmp / "data"),
        }
        for flag, value in overrides.items():
            args[args.index(flag) + 1] = value
        sidecar_proc, sidecar_log = procs.start(
            "sidecar", [sys.executable, "-m", "sidecar", "run", *args], {**base_env, **container_env(sidecar)}
        )
        wait_until_up(f"http://127.0.0.1:{mock_port}/v1/models", mock_proc, mock_log)
        wait_until_up(f"http://127.0.0.1:{admin_port}/readyz", sidecar_proc, sidecar_log)

        rules_file = tmp / "rules.yml"
        exported = yaml.safe_load(export.read_text())
        rules_file.write_text(yaml.safe_dump({"groups": exported["spec"]["groups"]}, sort_keys=False))
        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules_file)],
                    "scrape_configs": [
                        {
                            "job_name": "llm-sidecar",
                            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                        }
                    ],
                }
            )
        )
        prom_proc, prom_log = procs.start(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            base_env,
        )
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_until_up(f"{prometheus}/-/ready", prom_proc, prom_log)

        app = containers["app"]
        app_env = {
            **base_env,
            **container_env(app),
            "LLM_BASE_URL": f"http://127.0.0.1:{proxy_port}",
            "DEMO_REQUESTS_PER_SECOND": str(rate),
            "DEMO_WORKERS": str(workers),
            "DEMO_DURATION_SECONDS": str(traffic_seconds),
        }
        started = time.time()
        app_proc, app_log = procs.start("app", [sys.executable, str(scripts / "demo_app.py")], app_env)
        if app_proc.wait(timeout=traffic_seconds + 70) != 0:
            raise RuntimeError(f"the demo app failed:\n{app_log.read_text()[-3000:]}")
        for tenant in ("acme", "globex"):
            cut_stream(proxy_port, tenant)

        metrics_text = http_get(f"http://127.0.0.1:{admin_port}/metrics").decode()
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics_text.splitlines()
            if line.startswith("llm_requests_total{")
        )
        if served < 20:
            raise RuntimeError(f"only {served} calls measured:\n{app_log.read_text()[-2000:]}")
        stack = Stack(prometheus, metrics_text, logs, started, 0.0)
        deadline = time.monotonic() + 20
        while True:
            result = stack.api("query", query="sum(llm_requests_total)")["data"]["result"]
            if result and float(result[0]["value"][1]) >= served:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("Prometheus did not scrape the sidecar's final counts")
            time.sleep(0.5)
        time.sleep(2.5)  # a couple more scrapes: rate() over the last seconds sees the end
        stack.finished = time.time()
        yield stack
    finally:
        procs.stop_all()
