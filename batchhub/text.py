"""Text helpers: text that can always be written (JSON may carry lone surrogates, UTF-8
cannot), and aligned plain-text tables for the reports."""

from __future__ import annotations

from collections.abc import Sequence


def clean_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (the text itself when it has none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def text_table(rows: Sequence[Sequence[str]], *, left: int, rules_after: Sequence[int] = (0,)) -> list[str]:
    """Rows of cells as aligned lines: the first `left` columns left-aligned, the rest right-aligned,
    a rule of dashes after each row index in `rules_after` (0: after the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n in rules_after:
            lines.append("  ".join("-" * w for w in widths))
    return lines
