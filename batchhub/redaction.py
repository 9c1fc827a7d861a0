"""Keeping the API key out of everything a job stores or prints, even what a server echoes back.

- `redact(text, key)` for our own messages and a server's error messages: the key, every piece
  of 8 or more of its characters, and any `Bearer <token>`.
- `Redactor(key).scrub(text)` for the text of successful replies (content, ids, model, extra):
  the key and its pieces only (a reply may speak of bearer tokens), and cheap when the key is
  absent, which is every time but for a server that echoes it.
"""

from __future__ import annotations

import re

#: shortest piece of a key that is still redacted when it appears alone (a cut-off echo)
REDACT_MIN = 8
#: every piece of REDACT_MIN characters of a key holds one of its windows of _PROBE characters
#: that start at a multiple of _STRIDE (_PROBE + _STRIDE - 1 <= REDACT_MIN): looking for those
#: few windows tells for sure whether a text can hold any piece
_PROBE = 5
_STRIDE = REDACT_MIN - _PROBE + 1
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


def redact(text: str, secret: str | None) -> str:
    """Remove a secret, and any piece of 8 or more of its characters, from text that may reach a file or a screen.

    A server that echoes the Authorization header into an error body may have it cut anywhere
    by the time it is quoted, so pieces of the key are removed too, and any `Bearer <token>`.
    """
    text = _BEARER.sub(r"\1[redacted]", text)
    return _remove_pieces(text, secret) if secret and len(secret) >= 4 else text


def _remove_pieces(text: str, secret: str) -> str:
    if secret in text:
        text = text.replace(secret, "[redacted]")
    n = len(secret)
    for size in range(n - 1, REDACT_MIN - 1, -1):
        for start in range(0, n - size + 1):
            piece = secret[start : start + size]
            if piece in text:
                text = text.replace(piece, "[redacted]")
    return text


class Redactor:
    """Removes one key, and every piece of 8 or more of its characters, from a server's text."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret if secret and len(secret) >= 4 else None
        if self._secret is None:
            self._probes: tuple[str, ...] = ()
        elif len(self._secret) < REDACT_MIN:
            self._probes = (self._secret,)  # no piece is long enough: only the whole key
        else:
            n = len(self._secret)
            self._probes = tuple(self._secret[i : i + _PROBE] for i in range(0, n - _PROBE + 1, _STRIDE))

    def scrub(self, text: str | None) -> str | None:
        """`text` without the key or a piece of it (the same object when there is none to remove)."""
        if text is None or self._secret is None or not self.may_hold(text):
            return text
        return _remove_pieces(text, self._secret)

    def may_hold(self, text: str) -> bool:
        """False when `text` surely holds no piece of the key (one probe search per 4 key characters).

        Checking the fields of a reply joined in one text is about twice as fast as one by one."""
        return any(probe in text for probe in self._probes)
