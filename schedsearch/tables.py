"""Result tables as text, drawn by ``rich.table`` (the same look on a terminal, in a log file and in a pipe).

    print(table(["schedule", "1-cos"], [["searched", 0.0304], ["uniform", 0.1148]], title="held-out"))

Numbers are formatted with ``digits`` significant places (``fixed=True``: decimals; ``None`` prints ``-``) and
right-aligned; the text is plain (no colour codes), so it can be grepped and pasted into a report.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

__all__ = ["cell", "table"]


def cell(value: Any, digits: int = 4, fixed: bool = False) -> str:
    """One table cell: ``-`` for None; floats with ``digits`` significant places (``fixed``: decimals)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if fixed:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None, digits: int = 4,
          fixed: bool = False, width: int = 160) -> str:
    """Render ``rows`` under ``columns`` (first column left-aligned, numeric columns right-aligned)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, name in enumerate(columns):
        numeric = i > 0 and all(isinstance(r[i], int | float) or r[i] is None for r in rows if len(r) > i)
        t.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        t.add_row(*(cell(v, digits, fixed) for v in r))
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())
