"""One self-contained HTML report: summary table, figures as inline PNG, notes, more tables."""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; }
h3 { font-size: 1.05em; }
table.data { border-collapse: collapse; font-size: .9em; margin: .5em 0 1em; }
table.data th, table.data td { padding: .3em .7em; border-bottom: 1px solid #e4e4e4;
                               text-align: right; }
table.data thead th { border-bottom: 2px solid #bbb; background: #f6f6f6; }
table.data tbody tr:nth-child(even) { background: #fafafa; }
table.data tbody th { text-align: left; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
dl.notes dt { font-weight: 600; margin-top: .4em; }
dl.notes dd { margin-left: 1.2em; }
"""


def figure_to_png_bytes(fig: Any, *, dpi: int = 100) -> bytes:
    """A matplotlib Figure (or an Axes: its figure) as PNG bytes, without a 'Software' stamp."""
    if not hasattr(fig, "savefig"):
        fig = getattr(fig, "figure", None)
    if not hasattr(fig, "savefig"):
        raise TypeError(f"expected a matplotlib Figure or Axes, got {type(fig).__name__}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _number(value: float) -> str:
    """Floats in tables: four significant digits, big ones without an exponent."""
    if math.isnan(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _table(df: pd.DataFrame) -> str:
    return df.to_html(classes="data", border=0, float_format=_number, na_rep="–", escape=True)


def _notes(notes: Mapping | str) -> str:
    if isinstance(notes, str):
        paragraphs = [p.strip() for p in notes.split("\n\n") if p.strip()]
        return "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    items = []
    for key, value in notes.items():
        is_float = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
        shown = _number(float(value)) if is_float else str(value)
        items.append(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(shown)}</dd>")
    return '<dl class="notes">\n' + "\n".join(items) + "\n</dl>"


def write_report(
    path: str | Path,
    *,
    title: str,
    summary: pd.DataFrame | None,
    figures: Mapping[str, Any] | None = None,
    notes: Mapping | str | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write one self-contained HTML file (inline CSS, figures as base64 PNG, no external
    resources) and return its path. `figures` maps a caption to a Figure, an Axes or PNG
    bytes. The same inputs give the same file, up to the figures' bytes."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts += ["<h2>Notes</h2>", _notes(notes)]
    if summary is not None:
        parts += ["<h2>Summary</h2>", _table(summary)]
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, fig in figures.items():
            png = fig if isinstance(fig, bytes) else figure_to_png_bytes(fig)
            data = base64.b64encode(png).decode("ascii")
            caption = html.escape(str(name))
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    for name, df in (tables or {}).items():
        parts += [f"<h2>{html.escape(str(name))}</h2>", _table(df)]
    parts += ["</body>", "</html>", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
