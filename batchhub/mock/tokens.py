"""Token counting and deterministic completions of the simulated endpoint.

Token counting (a stand-in for a real tokenizer, which would need a download):

* a text's tokens are the matches of the regex ``\\w+|[^\\w\\s]``: every run of
  word characters is one token, every other non-space character is one token
  ("Hello, world!" is 4 tokens);
* ``prompt_tokens`` = the sum over messages of (3 + tokens of its content) + 3,
  the same per-message and per-reply overheads OpenAI documents for its chat
  models; a content given as a list of text parts counts the parts' texts;
* ``completion_tokens`` = tokens of the returned content, which is made of
  words from a small vocabulary, so it is the number of words.

Content is a pure function of the config seed and the request identity (the
sha256 of the canonical JSON of model + messages): the same request always gets
the same answer, whatever its temperature, and a different seed gives another.
An echoing simulator (`MockConfig.echo`) answers `echo: ` + the request's last
user message instead (`echo_completion`), so that a test can tell which request
a reply answered.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

#: OpenAI's documented overheads: each message costs 3 tokens on top of its
#: content, and every reply is primed with 3 more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
#: what an echoing simulator's answer starts with, before the request's last user message
ECHO_PREFIX = "echo: "

# fmt: off
VOCABULARY: tuple[str, ...] = (
    "the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "this",
    "by", "be", "are", "from", "at", "or", "data", "model", "result", "value", "batch", "prompt",
    "answer", "token", "request", "response", "rate", "limit", "order", "shard", "queue", "worker",
    "signal", "record", "column", "table", "field", "summary", "quickly", "clearly", "simply",
    "carefully", "usually", "often", "rarely", "always", "never", "small", "large", "quiet",
    "bright", "stable", "careful", "simple", "useful", "ready", "open", "runs", "reads", "writes",
    "checks", "counts", "sends", "keeps", "finds", "builds", "returns",
)
# fmt: on

# A small lexicon, so that the demo's labels follow the wording of the reviews.
# fmt: off
_POSITIVE: frozenset[str] = frozenset({
    "good", "great", "excellent", "love", "loved", "amazing", "awesome", "wonderful", "fantastic",
    "perfect", "best", "happy", "recommend", "nice", "delightful", "enjoyed", "pleasant", "superb",
    "brilliant", "fast",
})
_NEGATIVE: frozenset[str] = frozenset({
    "bad", "terrible", "awful", "hate", "hated", "horrible", "worst", "poor", "disappointing",
    "disappointed", "broken", "useless", "slow", "refund", "waste", "boring", "rude", "cheap",
    "faulty", "never",
})
# fmt: on


@dataclass(frozen=True)
class Completion:
    """The answer the endpoint will give to one request, known before it is sent."""

    content: str
    finish_reason: str
    completion_tokens: int
    #: the function call the answer is instead of content (a forced tool_choice), or None
    tool_call: dict[str, Any] | None = None


def count_tokens(text: str) -> int:
    """The number of tokens of `text` by the rule in this module's docstring."""
    return len(_TOKEN_RE.findall(text))


def count_prompt_tokens(texts: Sequence[str]) -> int:
    """prompt_tokens of a request whose messages have these contents."""
    return sum(TOKENS_PER_MESSAGE + count_tokens(t) for t in texts) + TOKENS_PER_REPLY


def request_identity(model: str, messages: Any) -> str:
    """sha256 hex of the canonical JSON of model + messages (what a request *is*)."""
    canonical = json.dumps(
        {"messages": messages, "model": model},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def choice_identity(identity: str, index: int) -> str:
    """The identity that seeds choice `index` of a request (choice 0: the request's own)."""
    return identity if index == 0 else f"{identity}:{index}"


def _rng_for(seed: int, identity: str) -> random.Random:
    # Seed from a digest rather than hash(): stable across processes and versions.
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sentiment(text: str) -> str:
    """A crude lexicon verdict, so the demo's labels follow the reviews' wording."""
    words = [w.lower() for w in re.findall(r"\w+", text)]
    score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    if score > 0:
        return "positive"
    if score < 0:
        return "negative"
    return "neutral"


def json_completion(completion: Completion, identity: str, *, broken: bool = False) -> Completion:
    """The answer as a JSON object, as a model in JSON mode gives it: `{"sentiment", "confidence"}`
    for a sentiment question, `{"answer", "words"}` otherwise.

    Cut off by max_tokens (finish_reason "length") the JSON is cut off too; `broken`
    gives what a model sometimes writes instead: prose around half an object.
    """
    if completion.content in ("positive", "negative", "neutral"):  # a sentiment question
        confidence = 0.55 + (int(hashlib.sha256(identity.encode()).hexdigest()[:4], 16) % 45) / 100
        text = json.dumps({"sentiment": completion.content, "confidence": confidence})
    else:
        text = json.dumps({"answer": completion.content, "words": len(completion.content.split())})
    if completion.finish_reason == "length":
        text = text[: len(text) // 2]
    if broken:
        text = "Sure! Here is the JSON: " + text[: len(text) // 2]
    return Completion(text, completion.finish_reason, count_tokens(text))


def _cut(content: str, finish_reason: str, limit: int | None, stop: Sequence[str]) -> Completion:
    """`content` cut after `limit` tokens (finish_reason "length") and before its first `stop` string."""
    if limit is not None:
        ends = [match.end() for match in _TOKEN_RE.finditer(content)]
        if len(ends) > limit:
            content = content[: ends[limit - 1]]
            finish_reason = "length"
    cuts = [i for i in (content.find(s) for s in stop if s) if i >= 0]
    if cuts:
        # The stop sequence ends generation before the length limit would have.
        content = content[: min(cuts)]
        finish_reason = "stop"
    return Completion(content, finish_reason, count_tokens(content))


def echo_completion(last_user_text: str | None, *, limit: int | None, stop: Sequence[str]) -> Completion:
    """The answer of an echoing simulator: `ECHO_PREFIX` + the last user message ("" without one),
    cut by the request's max_tokens and stop strings as any answer is."""
    return _cut(ECHO_PREFIX + (last_user_text or ""), "stop", limit, stop)


def make_completion(
    *,
    seed: int,
    identity: str,
    last_user_text: str | None,
    min_tokens: int,
    max_tokens: int,
    limit: int | None,
    stop: Sequence[str],
) -> Completion:
    """The completion for one request.

    `min_tokens`..`max_tokens` bound the natural length (drawn uniformly);
    `limit` is the request's max_tokens (a shorter answer ends with
    finish_reason "length"); the content is cut before the first `stop`
    string it contains (finish_reason "stop"). If the last user message
    mentions "sentiment", the answer is one word: positive, negative or neutral.
    """
    if last_user_text is not None and "sentiment" in last_user_text.lower():
        words = [_sentiment(last_user_text)]
    else:
        rng = _rng_for(seed, identity)
        length = rng.randint(min_tokens, max_tokens)
        words = [rng.choice(VOCABULARY) for _ in range(length)]
    finish_reason = "stop"
    if limit is not None and len(words) > limit:
        words = words[:limit]
        finish_reason = "length"
    content = " ".join(words)
    cuts = [i for i in (content.find(s) for s in stop if s) if i >= 0]
    if cuts:
        # The stop sequence ends generation before the length limit would have.
        content = content[: min(cuts)]
        finish_reason = "stop"
    return Completion(content, finish_reason, count_tokens(content))
