"""A bar chart as PNG with no dependency: an RGB canvas, a 5x7 bitmap font and zlib.

:func:`render` draws the benchmark's two panels (throughput per target, and latency
added over the upstream at one client) from the results that :mod:`bench.run` writes.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence

Color = tuple[int, int, int]

# The classic public-domain 5x7 font, ASCII 32-126: five column bytes per glyph, bit 0 at the top.
_FONT_HEX = (
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649552250 0005030000"
    " 001c224100 0041221c00 082a1c2a08 08083e0808 0050300000 0808080808 0060600000 2010080402"
    " 3e5149453e 00427f4000 4261514946 2141454b31 1814127f10 2745454539 3c4a494930 0171090503"
    " 3649494936 064949291e 0036360000 0056360000 0008142241 1414141414 4122140800 0201510906"
    " 324979413e 7e1111117e 7f49494936 3e41414122 7f4141221c 7f49494941 7f09090101 3e41415132"
    " 7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f0204027f 7f0408107f 3e4141413e"
    " 7f09090906 3e4151215e 7f09192946 4649494931 01017f0101 3f4040403f 1f2040201f 7f2018207f"
    " 6314081463 0304780403 6151494543 00007f4141 0204081020 41417f0000 0402010204 4040404040"
    " 0001020400 2054545478 7f48444438 3844444420 384444487f 3854545418 087e090102 081454543c"
    " 7f08040478 00447d4000 2040443d00 007f102844 00417f4000 7c04180478 7c08040478 3844444438"
    " 7c14141408 081414187c 7c08040408 4854545420 043f444020 3c4040207c 1c2040201c 3c4030403c"
    " 4428102844 0c5050503c 4464544c44 0008364100 00007f0000 0041360800 08082a1c08"
)
FONT: dict[str, bytes] = {chr(32 + i): bytes.fromhex(g) for i, g in enumerate(_FONT_HEX.split())}

WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GREY: Color = (150, 150, 150)
LIGHT: Color = (228, 228, 228)
PALETTE: dict[str, Color] = {
    "direct": (140, 140, 140),
    "floor": (70, 130, 180),
    "sidecar": (230, 120, 30),
    "sidecar+tracing": (150, 80, 170),
}


class Canvas:
    """An RGB image with rectangles and text."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> int:
        """Draw ``text`` with its top-left corner at (x, y); returns the x after it."""
        for ch in text:
            glyph = FONT.get(ch, FONT["?"])
            for col, bits in enumerate(glyph):
                for row in range(7):
                    if bits >> row & 1:
                        px, py = x + col * scale, y + row * scale
                        self.rect(px, py, px + scale, py + scale, color)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        """The image as PNG bytes (8-bit RGB, no filter)."""
        stride = self.width * 3
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of ``text`` drawn at ``scale``."""
    return len(text) * 6 * scale - scale


def nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) covering ``top`` in about ``ticks`` steps."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power: float = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


def fmt(value: float) -> str:
    """A short label for a bar's value."""
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2f}"


def bar_panel(
    canvas: Canvas,
    box: tuple[int, int, int, int],
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
) -> None:
    """Grouped bars in ``box`` (x0, y0, x1, y1): one group per label, one bar per series."""
    x0, y0, x1, y1 = box
    canvas.text(x0, y0, title, BLACK, 2)
    top_y, bottom_y, left_x = y0 + 30, y1 - 22, x0 + 44
    values = [v for vs in series.values() for v in vs if v is not None]
    top = max(values, default=1.0) * 1.15 or 1.0
    step = nice_step(top)
    top = step * math.ceil(top / step)
    height = bottom_y - top_y
    for i in range(round(top / step) + 1):
        y = bottom_y - round(i * step / top * height)
        canvas.rect(left_x, y, x1, y + 1, LIGHT)
        label = fmt(i * step)
        canvas.text(left_x - 4 - text_width(label), y - 3, label, GREY)
    canvas.rect(left_x, bottom_y, x1, bottom_y + 1, GREY)
    group_w = (x1 - left_x) / max(1, len(groups))
    names = list(series)
    bar_w = max(4, int(group_w * 0.9 / max(1, len(names))))
    for g, label in enumerate(groups):
        gx = left_x + round(g * group_w + group_w * 0.05)
        for s, name in enumerate(names):
            value = series[name][g]
            if value is None:
                continue
            bx = gx + s * bar_w
            by = bottom_y - round(max(0.0, value) / top * height)
            canvas.rect(bx + 1, by, bx + bar_w - 1, bottom_y, PALETTE.get(name, GREY))
            text = fmt(value)
            if text_width(text) <= bar_w + 4:
                canvas.text(bx + (bar_w - text_width(text)) // 2, by - 10, text, BLACK)
        lx = left_x + round(g * group_w + (group_w - text_width(label)) / 2)
        canvas.text(lx, bottom_y + 8, label, BLACK)


def render(results: Mapping[str, object]) -> bytes:
    """The benchmark chart of ``results`` (the JSON that :mod:`bench.run` writes) as PNG bytes."""
    cells = results["cells"]
    assert isinstance(cells, list)
    targets = [t for t in ("floor", "sidecar", "sidecar+tracing") if any(c["target"] == t for c in cells)]
    concurrency = sorted({int(c["concurrency"]) for c in cells})

    def cell(target: str, shape: str, conc: int) -> Mapping[str, float] | None:
        for c in cells:
            if c["target"] == target and c["shape"] == shape and c["concurrency"] == conc:
                found: Mapping[str, float] = c
                return found
        return None

    groups = [f"{shape} c={c}" for shape in ("json", "stream") for c in concurrency]
    throughput: dict[str, list[float | None]] = {}
    for t in targets:
        row: list[float | None] = []
        for shape in ("json", "stream"):
            for conc in concurrency:
                found = cell(t, shape, conc)
                row.append(found["rps"] if found else None)
        throughput[t] = row

    added = results.get("added_latency_c1", {})
    assert isinstance(added, Mapping)
    lat_groups = ["json p50", "json p99", "stream p50", "stream p99", "ttfb p50"]
    keys = ["json_p50_ms", "json_p99_ms", "stream_p50_ms", "stream_p99_ms", "ttfb_p50_ms"]
    latency = {t: [added.get(t, {}).get(k) for k in keys] for t in targets}

    canvas = Canvas(1200, 560)
    machine = results.get("machine", {})
    assert isinstance(machine, Mapping)
    canvas.text(20, 14, "llm-sidecar bench: one pinned core per target, same mock upstream", BLACK, 2)
    sub = (
        f"{results.get('date', '')}  {machine.get('cpu', '')}, {machine.get('cores_usable', '?')} cores, "
        f"Python {machine.get('python', '?')}  loadgen: {results.get('loadgen', '')}"
    )
    canvas.text(20, 38, sub[:190], GREY)
    bar_panel(canvas, (20, 64, 640, 500), "throughput, req/s (higher is better)", groups, throughput)
    bar_panel(canvas, (670, 64, 1180, 500), "ms added to direct, c=1 (lower: better)", lat_groups, latency)
    x = 64
    for t in targets:
        canvas.rect(x, 526, x + 16, 542, PALETTE.get(t, GREY))
        x = canvas.text(x + 22, 527, t, BLACK, 2) + 30
    direct = [c["rps"] for c in cells if c["target"] == "direct" and c["concurrency"] == 32]
    if direct:
        canvas.text(x, 531, f"(the upstream alone, c=32: {fmt(max(direct))} req/s)", GREY)
    return canvas.png()
