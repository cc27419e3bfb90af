"""Server-rendered SVG plots (no script; readable without colour).

:func:`budget_svg` draws a permit's cumulative privacy budget spent over time as a step line
with a square marker at each charge, against its cap as a dashed line labelled in text; the
axes carry their values in text, and the SVG has a title and a description naming the numbers,
so the plot is readable in greyscale and by a screen reader.
"""

from __future__ import annotations

from datetime import datetime
from html import escape

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 260, 64, 24, 20, 48


def budget_svg(points: list[tuple[datetime, float]], cap: float, start: datetime,
               end: datetime) -> str:
    """``points``: (time, cumulative epsilon spent) in time order; ``cap``: the permit's total."""
    span = max((end - start).total_seconds(), 1.0)
    top_value = max([cap, *(v for _, v in points)]) * 1.1 or 1.0

    def x(t: datetime) -> float:
        return LEFT + (W - LEFT - RIGHT) * min(max((t - start).total_seconds() / span, 0), 1)

    def y(v: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - v / top_value)

    spent = points[-1][1] if points else 0.0
    title = f"Privacy budget spent: epsilon {spent:.3g} of {cap:.3g}"
    desc = (f"{len(points)} charges between {start:%Y-%m-%d} and {end:%Y-%m-%d}; "
            f"cap epsilon {cap:.3g} shown as a dashed line.")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
             f'aria-labelledby="plot-title plot-desc" class="plot">',
             f'<title id="plot-title">{escape(title)}</title>',
             f'<desc id="plot-desc">{escape(desc)}</desc>',
             f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" '
             'class="axis"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" class="axis"/>']
    for frac in (0.0, 0.5, 1.0):
        value = top_value * frac
        parts.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
                     f'class="tick">{value:.3g}</text>')
    parts.append(f'<text x="{LEFT}" y="{H - BOTTOM + 18}" class="tick">{start:%Y-%m-%d}</text>')
    parts.append(f'<text x="{W - RIGHT}" y="{H - BOTTOM + 18}" text-anchor="end" '
                 f'class="tick">{end:%Y-%m-%d}</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle" '
                 'class="label">time</text>')
    parts.append(f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})" class="label">'
                 'epsilon spent</text>')
    parts.append(f'<line x1="{LEFT}" y1="{y(cap):.1f}" x2="{W - RIGHT}" y2="{y(cap):.1f}" '
                 'class="cap" stroke-dasharray="8 5"/>')
    parts.append(f'<text x="{W - RIGHT}" y="{y(cap) - 6:.1f}" text-anchor="end" '
                 f'class="label">cap {cap:.3g}</text>')
    if points:
        path = [f"M {x(start):.1f} {y(0):.1f}"]
        for t, v in points:
            path.append(f"H {x(t):.1f} V {y(v):.1f}")
        path.append(f"H {x(end):.1f}")
        parts.append(f'<path d="{" ".join(path)}" class="spent" fill="none"/>')
        for t, v in points:
            parts.append(f'<rect x="{x(t) - 3:.1f}" y="{y(v) - 3:.1f}" width="6" height="6" '
                         'class="mark"/>')
    parts.append("</svg>")
    return "".join(parts)
