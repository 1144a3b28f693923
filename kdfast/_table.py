"""Plain-text tables for the reports of `kdfast demo` and `kdfast bench`."""
from __future__ import annotations

__all__ = ["markdown_table"]


def markdown_table(header: tuple, rows: list[tuple]) -> str:
    """A GitHub-flavoured markdown table with padded columns, so that it reads as plain text too."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
