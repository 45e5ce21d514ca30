"""Render each dashboard's panels to a PNG from the same Prometheus queries Grafana would run.

    python dashboards/render.py --demo 90            # start the demo stack (see demo_stack.py),
                                                     # 90 s of traffic, render dashboards/img/*.png
    python dashboards/render.py --prometheus http://127.0.0.1:9090 --range 6h

Each panel is drawn where the dashboard puts it (Grafana's 24-column grid): time series as
lines (bars for per-day panels), stats as a big number, bar gauges as horizontal bars,
tables as text. Template variables are "All"; ``$__rate_interval`` is ``--rate-interval``.
It is a picture of what on-call and finance will see, not a Grafana replacement.

Needs matplotlib (``pip install matplotlib``); the README's pictures are made with it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dashboards.demo_stack import Stack, demo_stack  # noqa: E402
from dashboards.generate import DASHBOARDS  # noqa: E402

ROW_UNIT = 0.42  # inches per Grafana grid row
COL_UNIT = 0.72  # inches per Grafana grid column


def substitute(expr: str, window: str, rate_interval: str) -> str:
    for variable, value in {
        "$__rate_interval": rate_interval,
        "$__interval": rate_interval,
        "$__range": window,
        "$slo_objective": "0.999",
        "$tenant": ".*",
        "$upstream": ".*",
        "$provider": ".*",
        "$model": ".*",
    }.items():
        expr = expr.replace(variable, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    if template in ("", "__auto"):
        return ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def fmt(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value) or math.isinf(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.{2 if decimals is None else max(decimals - 2, 0)}f}%"
    if unit == "currencyUSD":
        return f"${value:,.{2 if decimals is None else decimals}f}"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.2f} req/s"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{0 if decimals == 0 else 2}f}"


def draw(
    board: dict[str, Any], stack: Stack, start: float, end: float, rate_interval: str, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    window = f"{max(int(end - start), 60)}s"
    step = max((end - start) / 120, 1.0)
    panels = board["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24 * COL_UNIT, height * ROW_UNIT + 0.8), facecolor="#111217")
    fig.suptitle(board["title"], color="white", fontsize=16, x=0.01, ha="left")
    top = 1 - 0.8 / (height * ROW_UNIT + 0.8)

    def axes(grid: dict[str, int]) -> Any:
        left = grid["x"] / 24
        bottom = top * (1 - (grid["y"] + grid["h"]) / height)
        # Room on the left for the tick labels and on top for the title.
        ax = fig.add_axes(
            (left + 0.03, bottom + 0.012, grid["w"] / 24 - 0.036, top * grid["h"] / height - 0.03)
        )
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#9fa7b3", labelsize=7)
        return ax

    for panel in panels:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(
                0.005, top * (1 - (grid["y"] + 0.7) / height), panel["title"], color="#d8d9da", fontsize=12
            )
            continue
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        decimals = panel["fieldConfig"]["defaults"].get("decimals")
        ax = axes(grid)
        ax.set_title(panel["title"], color="#d8d9da", fontsize=9, loc="left")

        def formatter(value: float, _pos: int, unit: str = unit) -> str:
            return fmt(value, unit)

        if panel["type"] == "timeseries":
            drawn = 0
            for target in panel["targets"]:
                expr = substitute(target["expr"], window, rate_interval)
                result = stack.api(
                    "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:.3f}"
                )
                for series in result.get("data", {}).get("result", [])[:8]:
                    xs = [float(t) - end for t, _ in series["values"]]
                    ys = [float(v) for _, v in series["values"]]
                    ax.plot(
                        xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"])
                    )
                    drawn += 1
            ax.yaxis.set_major_formatter(FuncFormatter(formatter))
            ax.set_xlabel("seconds before now", color="#9fa7b3", fontsize=7)
            if drawn:
                ax.legend(
                    fontsize=6, loc="upper left", framealpha=0.3, labelcolor="#d8d9da", facecolor="#181b1f"
                )
            else:
                ax.text(
                    0.5, 0.5, "No data", color="#9fa7b3", ha="center", va="center", transform=ax.transAxes
                )
            continue
        values: list[tuple[str, float]] = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], window, rate_interval)
            result = stack.api("query", query=expr, time=f"{end:.3f}")
            for series in result.get("data", {}).get("result", []):
                values.append(
                    (legend(target.get("legendFormat", ""), series["metric"]), float(series["value"][1]))
                )
        ax.set_xticks([])
        ax.set_yticks([])
        if not values:
            ax.text(0.5, 0.5, "No data", color="#9fa7b3", ha="center", va="center", transform=ax.transAxes)
        elif panel["type"] in ("stat", "gauge"):
            text = "\n".join(fmt(v, unit, decimals) for _, v in values[:3])
            ax.text(
                0.5,
                0.45,
                text,
                color="#73bf69",
                ha="center",
                va="center",
                fontsize=20,
                transform=ax.transAxes,
            )
        elif panel["type"] == "bargauge":
            values.sort(key=lambda item: item[1])
            names = [n for n, _ in values][-10:]
            numbers = [v for _, v in values][-10:]
            ax.barh(range(len(numbers)), numbers, color="#5794f2")
            for i, (name, number) in enumerate(zip(names, numbers, strict=True)):
                ax.text(
                    0, i, f" {name}: {fmt(number, unit, decimals)}", color="white", va="center", fontsize=7
                )
        else:  # table
            lines = [f"{name}  {fmt(value, unit, decimals)}" for name, value in values[:8]]
            ax.text(
                0.02, 0.95, "\n".join(lines), color="#d8d9da", va="top", fontsize=7, transform=ax.transAxes
            )
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Render every dashboard to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--demo", type=float, metavar="SECONDS", help="run the demo stack for SECONDS of traffic"
    )
    source.add_argument("--prometheus", metavar="URL", help="an existing Prometheus")
    parser.add_argument("--range", default="1h", help="with --prometheus: the time range (default 1h)")
    parser.add_argument("--rate-interval", default="15s", help="$__rate_interval (default 15s)")
    parser.add_argument("--out", type=Path, default=HERE / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def render_all(stack: Stack, start: float, end: float) -> None:
        for name, build in DASHBOARDS.items():
            path = args.out / name.replace(".json", ".png")
            draw(build(), stack, start, end, args.rate_interval, path)
            sys.stdout.write(f"wrote {path}\n")

    if args.demo is not None:
        with (
            tempfile.TemporaryDirectory(prefix="llm-sidecar-render-") as tmp,
            demo_stack(Path(tmp), traffic_seconds=args.demo, rate=8.0, workers=8) as stack,
        ):
            render_all(stack, stack.started, stack.finished)
    else:
        from sidecar.durations import parse_duration

        end = time.time()
        stack = Stack(args.prometheus.rstrip("/"), "", Path(), end - parse_duration(args.range), end)
        render_all(stack, stack.started, stack.finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
