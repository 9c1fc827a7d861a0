"""Counting prompt tokens offline, the way OpenAI's chat format counts them.

The tokenizer is `bpe-openai`, which ships its vocabularies inside the package
(tiktoken downloads its encodings at first use and fails without a network).
Which encoding a model uses follows tiktoken's published prefix rules:
o200k_base for gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series and gpt-oss models,
cl100k_base for gpt-4 and gpt-3.5. A `provider/` prefix (`openai/gpt-4o`) is
ignored. Any other model has no known tokenizer here: its count falls back to
characters / 4, and every report labels it as approximate.

Chat format overhead (OpenAI's published counting rule): 3 tokens per message,
plus the tokens of each field's value (role, content, name), plus 1 for a name,
plus 3 to prime the reply.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchhub import defaults

O200K_PREFIXES = (
    "gpt-5",
    "gpt-4.5",
    "gpt-4.1",
    "gpt-4o",
    "chatgpt-4o",
    "o1",
    "o3",
    "o4",
    "gpt-oss",
    "ft:gpt-4o",
    "ft:gpt-4.1",
)
CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "ft:gpt-4", "ft:gpt-3.5", "text-embedding-3", "text-embedding-ada")

#: label of the chars/4 fallback
APPROXIMATE = "approximate (characters / 4)"


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def encoding_name(model: str) -> str | None:
    """The tokenizer encoding of a model, or None when no tokenizer here covers it."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith(O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(CL100K_PREFIXES):
        return "cl100k_base"
    return None


@functools.lru_cache(maxsize=4)
def _encoding(name: str) -> _Encoding:
    import bpe_openai

    encoding: _Encoding = bpe_openai.get_encoding(name)
    return encoding


_WHITESPACE = (" ", "\n", "\t", "\r")


def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut before a whitespace.

    The tokenizer refuses a text of a million characters (or one making over 200,000 tokens)
    in one call. A token never spans a cut placed before a space, so the sum of the pieces'
    counts is the whole's count, give or take a token at a cut that finds no whitespace in
    the second half of its piece (a long run without spaces is cut at `size`).
    """
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(space, start + size // 2, end) for space in _WHITESPACE)
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


@dataclass(frozen=True)
class TokenCounter:
    """Counts the prompt tokens of chat messages for one model."""

    model: str
    encoding: str | None

    @classmethod
    def for_model(cls, model: str) -> TokenCounter:
        return cls(model, encoding_name(model))

    @property
    def label(self) -> str:
        return f"{self.encoding} (bpe-openai)" if self.encoding else APPROXIMATE

    @property
    def exact(self) -> bool:
        return self.encoding is not None

    def text(self, text: str) -> int:
        """Tokens of `text`; a long text is counted in pieces cut at whitespace (see `pieces`)."""
        if self.encoding is None:
            return math.ceil(len(text) / defaults.CHARS_PER_TOKEN)
        encode = _encoding(self.encoding).encode_ordinary
        if len(text) <= defaults.TOKENIZER_PIECE_CHARS:
            return len(encode(text))
        return sum(len(encode(piece)) for piece in pieces(text, defaults.TOKENIZER_PIECE_CHARS))

    def messages(self, messages: Sequence[dict[str, Any]]) -> int:
        total = defaults.TOKENS_PER_REQUEST
        for message in messages:
            total += defaults.TOKENS_PER_MESSAGE
            for key, value in message.items():
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                total += self.text(text)
                if key == "name":
                    total += 1
        return total
