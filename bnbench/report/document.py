"""The content of a report, independent of its format: sections holding text, tables and figures.

Table functions return DataFrames with raw numbers; the bench, train and comparison reports arrange them into
:class:`Section` objects; :func:`to_markdown` renders them as ``summary.md`` and ``bnbench.report.html`` as the
page, so the Markdown summary and the HTML page always say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["FigureRef", "Link", "Section", "Table", "Text", "format_value", "markdown_table", "to_markdown"]


@dataclass(frozen=True)
class Text:
    """A paragraph (plain text; renderers escape it)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of raw values; renderers format the numbers."""

    frame: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class FigureRef:
    """A figure: ``stem`` names its file (``stem.png``), ``figure`` is the matplotlib Figure."""

    stem: str
    figure: object
    caption: str = ""


@dataclass(frozen=True)
class Link:
    """A link to a file written beside the report (``href`` relative to it), with the text shown."""

    text: str
    href: str


@dataclass(frozen=True)
class Section:
    title: str
    items: Sequence[Text | Table | FigureRef | Link] = field(default_factory=tuple)
    level: int = 2


def format_value(value) -> str:
    """Numbers with 4 significant digits (no exponent for ordinary magnitudes), booleans and text as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        magnitude = abs(value)
        if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):  # numpy scalars
        return format_value(value.item())
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no index); '|' in cells is escaped."""
    if frame.empty:
        return "(none)"
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        cells = [format_value(v).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(sections: Sequence[Section], *, title: str = "", figure_suffix: str = ".png") -> str:
    """Render sections as Markdown; a figure becomes a link to ``stem + figure_suffix`` beside the file."""
    out: list[str] = [f"# {title}", ""] if title else []
    for section in sections:
        out += [f"{'#' * section.level} {section.title}", ""]
        for item in section.items:
            if isinstance(item, Text):
                out += [item.text, ""]
            elif isinstance(item, Table):
                if item.caption:
                    out += [item.caption, ""]
                out += [markdown_table(item.frame), ""]
            elif isinstance(item, FigureRef):
                out += [f"![{item.caption or item.stem}]({item.stem}{figure_suffix})", ""]
            elif isinstance(item, Link):
                out += [f"[{item.text}]({item.href})", ""]
            else:
                raise TypeError(f"unknown report item {type(item).__name__}")
    return "\n".join(out).rstrip() + "\n"
