"""A self-contained HTML page from report sections: figures embedded as base64 PNG data URIs, tables as HTML,
inline CSS, no script and no external asset, so the file opens in any browser without a network. The only links
are to files written beside the page (the data behind it, e.g. a copy of each results.csv).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from bnbench.report.document import FigureRef, Link, Section, Table, Text, format_value

__all__ = ["figure_data_uri", "figure_png", "render_html", "table_html"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .86rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
nav ul { columns: 2; }
.meta { color: #555; }
"""


def figure_png(fig, *, dpi: int = 110) -> bytes:
    """The figure rendered as PNG bytes (in memory; nothing written to disk)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell(value) -> str:
    numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    return (
        f'<td class="num">{html.escape(format_value(value))}</td>'
        if numeric
        else f"<td>{html.escape(format_value(value))}</td>"
    )


def table_html(frame: pd.DataFrame) -> str:
    """An HTML table of the frame's values formatted like the Markdown summary; every cell escaped."""
    if frame.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, k = base, 2
    while anchor in used:
        anchor, k = f"{base}-{k}", k + 1
    used.add(anchor)
    return anchor


def render_html(
    title: str, sections: Sequence[Section], *, subtitle: str = "", png: Mapping[str, bytes] | None = None
) -> str:
    """The whole page as one string: title, a table of contents, then each section's text, tables and figures.
    ``png`` maps figure stems to already rendered PNG bytes (the files the CLI writes), so each figure is
    rendered once; figures not in it are rendered here."""
    png = png or {}
    used: set[str] = set()
    anchors = [_anchor(s.title, used) for s in sections]
    toc = "".join(
        f'<li style="margin-left:{(s.level - 2) * 1.2}rem"><a href="#{a}">{html.escape(s.title)}</a></li>'
        for s, a in zip(sections, anchors, strict=True)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
    parts.append(f"<nav><ul>{toc}</ul></nav>")
    for section, anchor in zip(sections, anchors, strict=True):
        level = min(max(section.level, 2), 6)
        parts.append(f'<h{level} id="{anchor}">{html.escape(section.title)}</h{level}>')
        for item in section.items:
            if isinstance(item, Text):
                parts.append(f"<p>{html.escape(item.text)}</p>")
            elif isinstance(item, Table):
                if item.caption:
                    parts.append(f"<p>{html.escape(item.caption)}</p>")
                parts.append(table_html(item.frame))
            elif isinstance(item, FigureRef):
                caption = html.escape(item.caption or item.stem)
                parts.append(
                    f'<figure id="fig-{html.escape(item.stem)}"><img alt="{caption}" '
                    f'src="{figure_data_uri(png[item.stem] if item.stem in png else figure_png(item.figure))}"><figcaption>{caption}</figcaption></figure>'
                )
            elif isinstance(item, Link):
                parts.append(f'<p><a href="{html.escape(item.href)}">{html.escape(item.text)}</a></p>')
            else:
                raise TypeError(f"unknown report item {type(item).__name__}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
