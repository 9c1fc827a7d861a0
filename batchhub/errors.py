"""Every error batchhub raises on purpose.

The tree::

    BatchhubError                      exit_code 2 unless a subclass says otherwise
    ├── UsageError                     bad flags, spec file or option values (exit 2)
    │   └── InputError                 the input file cannot be used (exit 2)
    ├── JobStateError                  the job directory disagrees with the request (exit 2)
    ├── StorageError                   an s3:// or gs:// URL cannot be used: bad URL, no bucket, access denied (exit 2)
    │   └── CommitError                a job's file could not be uploaded mid-run; also an OSError (exit 3)
    ├── RowError                       one row cannot become a request: it fails unsent (never leaves a job)
    ├── APIError                       the endpoint answered with an error, or not at all
    │   ├── RetryableError             worth another attempt
    │   │   ├── RateLimitError         429 (carries retry_after)
    │   │   ├── ServerError            500, 502, 503, 504 and other 5xx, an error inside an event stream
    │   │   ├── ConflictError          409: a conflict (a lock timeout), not this row's fault
    │   │   ├── TransportError         timeout, 408, connection reset, body cut off in transit
    │   │   │   └── ConnectError       no connection at all (DNS failure, connection refused)
    │   │   └── BadResponseError       a body that is not what the API documents (HTML, bad JSON, no choices)
    │   ├── RequestRejected            400 and other 4xx: permanent for this row
    │   │   └── RowModelNotFound       404 model_not_found for a model the row names (a model column, a Batch line)
    │   ├── ResponseTooLargeError      a reply past max_response_bytes: permanent for this row
    │   └── FatalAPIError              no point sending the rest of the job (exit 3); also a 3xx redirect
    │       ├── AuthenticationError    401
    │       ├── PermissionDeniedError  403
    │       ├── QuotaExceededError     429 with code insufficient_quota
    │       ├── NotFoundError          404: no such model, or no such endpoint (a base URL without /v1)
    │       ├── UnreachableError       the endpoint cannot be reached: every attempt of a row failed to connect
    │       └── RepeatedError          the run's first requests all failed with the same 4xx (fail-fast)
    └── JobStopped                     the job stopped early and can be resumed (exit 3)

Which status and which client exception become which `APIError` is one table, in
`batchhub.http_errors`; whether and when to retry is `batchhub.retry`.

Every `APIError` carries its context as attributes (status, code, request_id, retry_after,
error_object), each None when the reply did not say, so that callers decide on types and
fields, never on message text; a `RowError` carries its `error_type`, a `JobStopped` its
`reason` and, when an exception stopped it, that `cause`. The row an error belongs to is
the caller's to record: the runner records each result under its `row_id`.
Messages never contain the API key: they are built from the server's error body,
the status and our own words, never from request headers.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3


class BatchhubError(Exception):
    """Base of every error batchhub raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(BatchhubError):
    """A flag, spec file entry or option value is wrong."""


class InputError(UsageError):
    """The input file cannot be used as it is (missing, unreadable, empty, wrong columns)."""


class JobStateError(BatchhubError):
    """The job directory does not match what was asked (changed input or request config)."""


class StorageError(BatchhubError):
    """An object-store URL cannot be used: not a URL batchhub reads, no such bucket or object, access
    denied, the store unreachable. Its message is one line and never holds a credential."""


class CommitError(StorageError, OSError):
    """A file of a job in a bucket could not be uploaded (the store went down mid-run). It is an OSError
    too, so a run meets it as a disk failure: it stops, resumable (exit 3), with what it made kept on this
    machine for the next run to upload."""

    exit_code = EXIT_STOPPED


class RowError(BatchhubError):
    """This row cannot be turned into a request; it fails without being sent.

    `error_type` is what its result records (`invalid_row`, `empty_prompt`).
    """

    def __init__(self, message: str, error_type: str = "invalid_row") -> None:
        super().__init__(message)
        self.error_type = error_type


class APIError(BatchhubError):
    """The endpoint answered with an error status, or the call failed in transit."""

    #: short machine-readable kind, stored in the `error_type` result column
    error_type: str = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        error_object: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        #: the server's `error` object (message, type, param, code) as it sent it, if it sent one
        self.error_object = error_object

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{prefix}{self.message}"


class RetryableError(APIError):
    """A failure worth another attempt."""

    error_type = "retryable"


class RateLimitError(RetryableError):
    """429: slow down. `retry_after` is the server's hint in seconds, if it gave one."""

    error_type = "rate_limited"


class ServerError(RetryableError):
    """5xx: the server failed; another attempt may succeed."""

    error_type = "server_error"


class ConflictError(RetryableError):
    """409: the request conflicted with another (a lock timeout); retried, as openai-python does."""

    error_type = "conflict"


class TransportError(RetryableError):
    """Timeout (ours, or the server's 408), connection reset, or a body cut off in transit."""

    error_type = "transport_error"


class ConnectError(TransportError):
    """No connection could be made: the host name does not resolve, or nothing listens there.

    Retried like any transport error (a network may be flaky mid-job), but a row whose every
    attempt failed to connect stops the job (`UnreachableError`) instead of being recorded.
    """

    error_type = "connect_error"


class BadResponseError(RetryableError):
    """A 2xx body that is not what the API documents: not JSON, no choices, a broken event stream."""

    error_type = "bad_response"


class RequestRejected(APIError):
    """400 and other 4xx (not 401, 403, 404, 408, 409, 429): this row's request is wrong; do not retry it."""

    error_type = "invalid_request"


class RowModelNotFound(RequestRejected):
    """404 model_not_found for a model the row itself names (a model column, a Batch line): that row fails."""

    error_type = "not_found"


class ResponseTooLargeError(APIError):
    """A reply larger than `max_response_bytes`: not kept, and not asked for again (it would come again)."""

    error_type = "response_too_large"


class FatalAPIError(APIError):
    """An error that makes every other request pointless: stop the job."""

    exit_code = EXIT_STOPPED
    error_type = "fatal"


class AuthenticationError(FatalAPIError):
    """401: the API key is missing or wrong."""

    error_type = "authentication"


class PermissionDeniedError(FatalAPIError):
    """403: this key may not use this model."""

    error_type = "permission_denied"


class QuotaExceededError(FatalAPIError):
    """429 with code insufficient_quota: the account is out of credit, not rate limited."""

    error_type = "insufficient_quota"


class NotFoundError(FatalAPIError):
    """404: the model does not exist (code model_not_found), or the URL is not a chat completions endpoint."""

    error_type = "not_found"

    def explained(self, url: str, model: str | None) -> NotFoundError:
        """The same error, its message naming the model or the URL the 404 was for."""
        if self.code == "model_not_found":
            text = f"model {model!r} not found at {url}: {self.message}"
        else:
            hint = "is /v1 missing from the base URL?" if "/v1/" not in url else "check the base URL and the model"
            text = f"no such endpoint {url} (model {model!r}): {hint} The server said: {self.message}"
        return NotFoundError(text, status=self.status, code=self.code, request_id=self.request_id)


class UnreachableError(FatalAPIError):
    """The endpoint cannot be reached: every attempt of a row failed to connect (DNS, connection refused)."""

    error_type = "unreachable"


class RepeatedError(FatalAPIError):
    """The run's first requests all failed with the same non-retryable error: the job, not the rows, is wrong."""

    error_type = "repeated_error"


class JobStopped(BatchhubError):
    """The job stopped before every row was done; running it again resumes it.

    `reason` is a short word for why (`read_error`, `interrupted`...); `cause` the exception
    that stopped it, when one did (also its `__cause__`).
    """

    exit_code = EXIT_STOPPED

    def __init__(self, message: str, *, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.cause = cause
