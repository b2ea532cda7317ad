"""The one table formatter: every command's tables, as aligned text for a terminal or a summary file,
and as GitHub markdown for report.md. Callers format the cells (units and precision are theirs); this
module only lays them out, so the same rows read the same in both places."""

from collections.abc import Sequence


def _cells(header: Sequence, rows: Sequence) -> tuple[list, list]:
    header = [str(h) for h in header]
    rows = [[str(c) for c in row] for row in rows]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under a header of {len(header)}: {row}")
    return header, rows


def _alignment(align: str | None, n: int) -> str:
    """'l' or 'r' per column; the default: the first column left, the rest (numbers) right."""
    align = align or "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"align must be {n} of 'l'/'r', got {align!r}")
    return align


def text(header: Sequence, rows: Sequence, align: str | None = None, indent: str = "  ", gap: int = 2) -> str:
    """Columns padded to their widest cell, `gap` spaces apart, every line indented; ends in a newline."""
    header, rows = _cells(header, rows)
    align = _alignment(align, len(header))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True))
        return (indent + (" " * gap).join(padded)).rstrip()

    return "\n".join(line(r) for r in [header, *rows]) + "\n"


def markdown(header: Sequence, rows: Sequence, align: str | None = None) -> list[str]:
    """GitHub markdown lines: a header, its alignment row, one line per row."""
    header, rows = _cells(header, rows)
    align = _alignment(align, len(header))
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]
