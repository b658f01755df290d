"""Inline SVG drawn on the server: line charts (one point per history record, a circle each) and heatmaps."""

from __future__ import annotations

from html import escape
from typing import Sequence

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], title: str, chart_id: str,
               width: int = 520, height: int = 260, y_label: str = "", x_label: str = "step") -> str:
    """``series``: (name, [(x, y), ...]) each; every point is a ``<circle class="point">`` carrying its values."""
    points = [(x, y) for _, values in series for x, y in values if y is not None]
    left, right, top, bottom = 56, 12, 28, 38
    if not points:
        return (f'<svg id="{escape(chart_id)}" class="chart" width="{width}" height="{height}" role="img">'
                f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">{escape(title)}: no points yet</text></svg>')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [f'<svg id="{escape(chart_id)}" class="chart" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for i in range(5):  # y ticks
        value = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" text-anchor="end" class="tick">{value:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{sy(value):.1f}" x2="{width - right}" y2="{sy(value):.1f}" class="grid"/>')
    for value in (x0, (x0 + x1) / 2, x1):
        out.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 14}" text-anchor="middle" class="tick">{value:.4g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle" class="tick">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{top + (height - top - bottom) / 2}" transform="rotate(-90 12 '
                   f'{top + (height - top - bottom) / 2})" text-anchor="middle" class="tick">{escape(y_label)}</text>')
    for index, (name, values) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        kept = [(x, y) for x, y in values if y is not None]
        if not kept:
            continue
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(kept))
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.6" class="line"/>')
        for x, y in kept:
            out.append(f'<circle class="point" data-series="{escape(name)}" data-x="{x:g}" data-y="{y:.6g}" '
                       f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}"><title>{escape(name)} '
                       f'step {x:g}: {y:.4g}</title></circle>')
        out.append(f'<rect x="{width - right - 150}" y="{top + 4 + 14 * index}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{width - right - 136}" y="{top + 13 + 14 * index}" class="legend">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], chart_id: str, cell: int = 40) -> str:
    """A confusion matrix: rows true labels, columns predictions; each cell ``<g class="cell">`` shows its count."""
    n = len(matrix)
    left, top = 110, 90
    width, height = left + cell * n + 10, top + cell * n + 10
    peak = max([max(row) for row in matrix if row] + [1])
    out = [f'<svg id="{escape(chart_id)}" class="heatmap" width="{width}" height="{height}" role="img" '
           'aria-label="confusion matrix"><title>confusion matrix (rows: true, columns: predicted)</title>',
           f'<text x="{left}" y="14" class="tick">predicted →</text>',
           f'<text x="4" y="{top - 6}" class="tick">true ↓</text>']
    for j, name in enumerate(labels):
        x = left + j * cell + cell / 2
        out.append(f'<text x="{x}" y="{top - 6}" transform="rotate(-45 {x} {top - 6})" class="tick">{escape(str(name))}</text>')
    for i, row in enumerate(matrix):
        out.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end" class="tick">'
                   f'{escape(str(labels[i]) if i < len(labels) else str(i))}</text>')
        for j, value in enumerate(row):
            shade = value / peak
            fill = f"rgba(31,119,180,{0.08 + 0.85 * shade:.3f})"
            ink = "#fff" if shade > 0.55 else "#111"
            out.append(f'<g class="cell" data-row="{i}" data-col="{j}" data-value="{value:g}">'
                       f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" fill="{fill}" '
                       f'stroke="#fff"/><text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" '
                       f'text-anchor="middle" fill="{ink}">{value:g}</text></g>')
    out.append("</svg>")
    return "".join(out)
