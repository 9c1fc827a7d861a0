"""Text that can always be written: JSON may carry lone surrogates ("\\ud800"), UTF-8 cannot."""

from __future__ import annotations


def clean_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (the text itself when it has none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text
