"""The ``llm-sidecar`` command (also ``python -m sidecar``): the only place that prints or exits.

Subcommands: ``run``, ``config check``, ``demo``, and those the alerting and ledger
modules add (``rules``, ``incidents``, ``cost``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from sidecar import __version__, costreport, pricing
from sidecar import config as config_mod
from sidecar.errors import ConfigError
from sidecar.gateway import commands as key_commands
from sidecar.rules import commands as rule_commands

log = logging.getLogger("sidecar.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp's own access log is off; its error log stays.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _load_config(args: argparse.Namespace) -> config_mod.Config:
    if args.config:
        cfg = config_mod.load_file(args.config)
    elif args.upstream:
        cfg = config_mod.default_config()
    else:
        raise SystemExit("llm-sidecar run: give --upstream URL or --config FILE")
    cfg = cfg.with_overrides(
        listen=args.listen,
        admin_listen=args.admin_listen,
        upstream_url=args.upstream,
        pricing_file=args.pricing,
        data_dir=args.data_dir,
    )
    if getattr(args, "state", None):
        cfg = _with_state(cfg, args.state)
    return cfg


def _with_state(cfg: config_mod.Config, url: str) -> config_mod.Config:
    """``--state URL``: the shared state's URL, over the config's ``state.url`` (other keys kept)."""
    import dataclasses

    from sidecar.errors import Problem
    from sidecar.gateway.sharedstate import StateConfig, check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise ConfigError([Problem("<flags>", 0, 0, "--state", str(exc))]) from None
    state = dataclasses.replace(cfg.state, url=url) if cfg.state is not None else StateConfig(url=url)
    return dataclasses.replace(cfg, state=state)


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(str(problem), file=sys.stderr)
    if not exc.problems:
        print(str(exc), file=sys.stderr)


async def _serve(args: argparse.Namespace) -> int:
    from sidecar.alerting import AlertingSettings, settings_from
    from sidecar.app import Sidecar

    cfg = _load_config(args)

    def reload_config() -> config_mod.Config:
        return _load_config(args)

    def alerting_settings(config: config_mod.Config) -> AlertingSettings:
        return settings_from(config.rules, config.notify, rule_flags=args.rules, notify_flags=args.notify)

    sidecar = Sidecar(
        cfg,
        config_path=args.config,
        reload_config=reload_config,
        alerting=alerting_settings(cfg),
        alerting_for=alerting_settings,
    )
    await sidecar.start()
    # Everything built at start (config, price table, rules, registries, the tokenizer's
    # tables when loaded) lives as long as the process: keep it out of the cyclic garbage
    # collector's full passes, which would otherwise walk it all every few hundred calls.
    gc.freeze()
    # A call allocates a few hundred objects, nearly all freed by reference counting; at
    # the default 700 allocations the young generation was collected every few calls, each
    # time walking the objects of every call in flight: 3.3 % of the CPU under 32
    # concurrent streams (perf), 0.5 % at this threshold. Cycles still go, a little later.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(asyncio.to_thread(sidecar.reload))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Announce readiness only once the signal handlers are in place.
    print(
        f"llm-sidecar {__version__}: proxy on http://{cfg.listen[0]}:{sidecar.proxy_port}, "
        f"metrics on http://{cfg.admin.listen[0]}:{sidecar.admin_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    log.info("stopping: draining in-flight calls (up to %.0fs)", cfg.shutdown.drain_timeout)
    await sidecar.stop()
    log.info("stopped")
    return 0


#: The interpreter's thread switch interval while serving (seconds; Python's default is 0.005).
SWITCH_INTERVAL = 0.0005
#: Allocations between two collections of the young generation while serving (Python's
#: default is 700).
GC_YOUNG_THRESHOLD = 10_000


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for (``auto``: when it is installed), else asyncio's own."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise SystemExit("llm-sidecar run: --loop uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def cmd_run(args: argparse.Namespace) -> int:
    """``llm-sidecar run``: serve until SIGTERM."""
    _setup_logging(args.log_level)
    # The ledger writer, rule engine, call log and estimator threads hold the GIL in short
    # bursts; with the default 5 ms switch interval a call waiting on the event loop could
    # wait that long for it (seen as +4.8 ms at p99 with one client). 0.5 ms bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            return runner.run(_serve(args))
    except ConfigError as exc:
        _print_problems(exc)
        return 2


def cmd_config_check(args: argparse.Namespace) -> int:
    """``llm-sidecar config check FILE``: validate a config (and its price table) without starting."""
    try:
        cfg = config_mod.load_file(args.file)
        if cfg.pricing.file:
            pricing.load_file(cfg.pricing.file)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    print(f"{args.file}: ok ({len(cfg.upstreams)} upstream(s))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``llm-sidecar demo``: the embedded default — mock upstream, sidecar, traffic, summary."""
    from sidecar.demo import run_demo

    _setup_logging(args.log_level)
    return asyncio.run(run_demo(duration=args.duration, tenants=args.tenants, concurrency=args.concurrency))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="llm-sidecar", description="Observability and SLA sidecar for LLM APIs"
    )
    parser.add_argument("--version", action="version", version=f"llm-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar in front of an upstream")
    run.add_argument(
        "--upstream", metavar="URL", help="the one upstream to forward to (replaces the config's)"
    )
    run.add_argument("--listen", metavar="HOST:PORT", help="proxy listener (default 127.0.0.1:8080)")
    run.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener (default 127.0.0.1:9464)")
    run.add_argument("--pricing", metavar="FILE", help="price table (default: the packaged catalogue)")
    run.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    run.add_argument("--data-dir", metavar="DIR", help="data directory (default ./sidecar-data)")
    run.add_argument(
        "--rules",
        metavar="PATH",
        action="append",
        default=[],
        help="alert rule file or directory (repeatable)",
    )
    run.add_argument(
        "--notify",
        metavar="NAME=URL",
        action="append",
        default=[],
        help="notification channel NAME with an apprise URL (repeatable)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (default auto: uvloop when installed)",
    )
    run.add_argument(
        "--state",
        metavar="URL",
        help="shared state for rate limits across replicas (redis://host:6379/0); overrides state.url",
    )
    run.set_defaults(func=cmd_run)

    cfg = sub.add_parser("config", help="config file tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    demo = sub.add_parser("demo", help="run the built-in demo (mock upstream, traffic, summary)")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (default 30)")
    demo.add_argument("--tenants", type=int, default=5, help="number of tenants (default 5)")
    demo.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(func=cmd_demo)

    rule_commands.add_commands(sub)
    costreport.add_commands(sub)
    key_commands.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-sidecar``."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
