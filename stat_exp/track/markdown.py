"""One GitHub markdown table renderer for every table the package writes (sweep reports, the plan,
benchmark tables): cells are already strings, and a `|` inside one is escaped."""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The table, one line per row, without a trailing newline."""

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])
