"""Text formatting shared by every report: tables, byte counts, path samples."""

from __future__ import annotations

from lora_jax._core.errors import error

__all__ = ["table", "fmt_bytes", "sample_paths"]


def table(header: list[str], rows: list[list], align: str) -> str:
    """A plain-text table: a header, a rule, one line per row.

    ``align`` has one character per column, ``"<"`` (left) or ``">"`` (right).

    Example:
      >>> print(table(["path", "n"], [["a/kernel", 3], ["b", 12]], "<>"))
      path       n
      --------  --
      a/kernel   3
      b         12
    """
    if len(align) != len(header):
        raise error("table", f"align={align!r} has {len(align)} columns but the header has "
                    f"{len(header)}", "give one '<' or '>' per column")
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.ljust(w) if a == "<" else c.rjust(w)
                 for c, w, a in zip(r, widths, align, strict=True)]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """Decimal units, as disk and model sizes are quoted: ``8.4 MB``, ``13.5 GB``.

    Example:
      >>> fmt_bytes(8_388_608), fmt_bytes(13_476_831_232), fmt_bytes(512)
      ('8.4 MB', '13.5 GB', '512 B')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def sample_paths(paths: list[str], n: int = 8) -> str:
    """Up to ``n`` paths, one per line (indented), and how many more there are.

    Example:
      >>> print(sample_paths(["a", "b", "c"], n=2))
      a
        b ... (1 more)
    """
    shown = list(paths)[:n]
    more = f" ... ({len(paths) - n} more)" if len(paths) > n else ""
    return "\n  ".join(shown) + more
