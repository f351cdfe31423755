"""Plots of the status page as hand-written SVG: drawn on the server, nothing fetched by
the browser (no CDN, no script), readable in any browser and in a screenshot."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 520, 220
LEFT, BOTTOM, TOP = 48, 36, 16
COLOUR = "#3a6ea5"


def bars(title: str, labels: list[str], values: list[float], unit: str = "") -> str:
    """A vertical bar chart of `values` named by `labels`, each bar with its value on top."""
    top = max(values, default=0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(values), 1)
    out = [_head(title)]
    out.append(_axes(plot_h, top, unit))
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = plot_h * value / top
        x = LEFT + i * step + step * 0.15
        y = TOP + plot_h - h
        w = step * 0.7
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{COLOUR}">'
            f"<title>{escape(label)}: {value:.3g}{escape(unit)}</title></rect>"
        )
        if len(values) <= 24:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{y - 3:.1f}" font-size="10" '
                f'text-anchor="middle">{value:.3g}</text>'
            )
        if label:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{HEIGHT - BOTTOM + 14}" font-size="10" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    if not values:
        out.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#888">'
            "nothing stored yet</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _head(title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'font-family="sans-serif">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>'
    )


def _axes(plot_h: float, top: float, unit: str) -> str:
    base = TOP + plot_h
    lines = [
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - 8}" y2="{base}" stroke="#333"/>',
    ]
    for frac in (0.5, 1.0):
        y = base - plot_h * frac
        lines.append(
            f'<text x="{LEFT - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">'
            f"{top * frac:.3g}{escape(unit)}</text>"
        )
        lines.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - 8}" y2="{y:.1f}" stroke="#ddd"/>'
        )
    return "".join(lines)
