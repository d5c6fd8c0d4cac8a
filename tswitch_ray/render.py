"""How `tswitch registry query` prints a result: a terminal table, CSV, JSON or Markdown.

Catalog rows are wide (an artifact set has ~20 columns, a result row URIs and
option strings); squeezed into an 80-column terminal, rich folds every cell
into a tall, unreadable column. So ``table`` prints a normal table when it
fits the terminal and otherwise one compact two-column block per row
(column, value), like psql's expanded display.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

FORMATS = ("table", "csv", "json", "markdown")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in values escaped)."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(_cell(r[c])) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _natural_width(columns: list[str], rows: list[dict[str, Any]]) -> int:
    widths = [max([len(c)] + [len(_cell(r[c])) for r in rows]) for c in columns]
    return sum(widths) + 3 * len(columns) + 1  # rich's borders and padding


def render_query(table: Any, fmt: str, out: Console) -> None:
    """Print a pyarrow table in ``fmt`` (one of :data:`FORMATS`) on ``out``."""
    columns, rows = list(table.column_names), table.to_pylist()
    if fmt == "json":
        out.file.write(json.dumps(rows, default=str) + "\n")
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        out.file.flush()
        pacsv.write_csv(table, sys.stdout.buffer)
    elif fmt == "markdown":
        out.file.write(to_markdown(columns, rows))
    elif _natural_width(columns, rows) <= out.width:
        t = Table(*columns)
        for r in rows:
            t.add_row(*(_cell(r[c]) for c in columns))
        out.print(t)
    else:
        for i, r in enumerate(rows, 1):
            t = Table(title=f"row {i} of {len(rows)}", title_justify="left", show_header=False, box=None, padding=(0, 1))
            t.add_column(style="bold", no_wrap=True)
            t.add_column(overflow="fold")
            for c in columns:
                t.add_row(c, _cell(r[c]))
            out.print(t)
        if not rows:
            out.print(f"(no rows; columns: {', '.join(columns)})")
