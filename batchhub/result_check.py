"""Whether a row's recorded result is still its row's: it answers the request the row sends now.

A result answered the request named by its `request_hash` (batchhub/requests.py). It stays its
row's while that is the request the row sends now, or the one the row sent under settings a
`--force` run replaced (kept in job.json as `earlier_requests`: what they answered stays the
rows' while the settings that replaced them stand). A row that could not be sent has a result
without a hash: it stands while the row still cannot be built. A result recorded before request
hashes named requests (seq up to job.json's `legacy_hash_seq`) is compared with the hash it was
recorded with (`RequestBuilder.legacy_hash`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchhub.errors import BatchhubError
from batchhub.requests import RequestBuilder, RowError
from batchhub.spec import REQUEST_FIELDS, JobSpec

if TYPE_CHECKING:
    from batchhub.prepare import PreparedJob


class ResultCheck:
    """The check of one run: the job's request builder, and those of the settings --force runs replaced."""

    def __init__(self, prepared: PreparedJob) -> None:
        self._prepared = prepared
        self._earlier: list[RequestBuilder] | None = None

    def answers(self, row: dict[str, Any], stored: bytes, seq: int) -> bool:
        """Whether a result (its request_hash `stored`, its `seq`) answered the request of `row`."""
        if not stored:  # a row that could not be sent: its result stands while the row still cannot be
            try:
                self._prepared.builder.build(row)
            except RowError:
                return True
            return False
        legacy = seq <= (self._prepared.manifest.legacy_hash_seq or 0)
        for builder in (self._prepared.builder, *self.earlier_builders()):
            try:
                now = builder.legacy_hash(row) if legacy else builder.build(row).request_hash
            except RowError:
                continue  # the row cannot be sent with these settings: the result is not of them
            if now.encode() == stored:
                return True
        return False

    def _standing(self) -> list[dict[str, Any]]:
        """The settings --force runs replaced whose results stand now: those replaced by the settings of now, and
        in turn those replaced by settings that stand (an entry without `replaced_by`, of an older batchhub,
        stands). Settings changed since without --force replace them all: every row is asked again."""
        prepared = self._prepared
        defaults_config = JobSpec().request_config()
        standing = [(prepared.spec.request_config(), prepared.builder.endpoint)]
        kept: list[dict[str, Any]] = []
        for earlier in reversed(prepared.manifest.earlier_requests):
            by = earlier.get("replaced_by")
            if isinstance(by, dict):
                replacing = ({**defaults_config, **dict(by.get("request_config") or {})}, by.get("endpoint"))
                if replacing not in standing:
                    continue
            config = {**defaults_config, **dict(earlier.get("request_config") or {})}
            standing.append((config, earlier.get("endpoint") or prepared.builder.endpoint))
            kept.append(earlier)
        return kept

    def earlier_builders(self) -> list[RequestBuilder]:
        """The request builders of the settings --force runs replaced that stand (those that still fit the input)."""
        if self._earlier is None:
            self._earlier = []
            prepared = self._prepared
            for earlier in self._standing():
                fields = {k: v for k, v in dict(earlier.get("request_config") or {}).items() if k in REQUEST_FIELDS}
                try:
                    builder = RequestBuilder(
                        JobSpec(**fields),
                        prepared.source.columns,
                        endpoint=earlier.get("endpoint") or prepared.builder.endpoint,
                    )
                except (BatchhubError, TypeError, ValueError):
                    continue  # settings this input cannot be built with: no row's result was made under them
                self._earlier.append(builder)
        return self._earlier
