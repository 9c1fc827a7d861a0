"""Every tunable default of batchhub, in one place, each with the reason for its value."""

from __future__ import annotations

#: The provider batchhub is made for; any OpenAI-compatible base URL works.
DEFAULT_BASE_URL = "https://ai-tokenhub.com/v1"
#: OpenAI's endpoint: the one `OPENAI_API_KEY` is sent to (besides `$OPENAI_BASE_URL`, when the job's).
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: `base_url = "mock://"` (or `--mock`) runs the job on the built-in simulated endpoint.
MOCK_BASE_URL = "mock://"
#: A key the in-process simulator accepts, used when no key is configured for a mock run.
MOCK_API_KEY = "mock-key"

#: Requests in flight at once: enough to hide a second of latency at a few thousand RPM.
CONCURRENCY = 32
#: The most requests in flight a job may ask for: each is an open connection and a worker,
#: and no endpoint serves more from one client usefully; far more exhausts file descriptors.
MAX_CONCURRENCY = 1000
#: Attempts per row for failures worth retrying (5xx, timeouts, garbled bodies).
MAX_ATTEMPTS = 5
#: 429s a single row may meet before it is recorded as failed; counted apart from
#: MAX_ATTEMPTS so that a long rate-limit storm does not use up a row's attempts.
MAX_RATE_LIMIT_RETRIES = 100
#: Seconds a single request may take (connect + response), long generations included.
TIMEOUT_S = 120.0

#: Bytes read of one response at most (a streamed one's events counted together): a chat reply is
#: kilobytes, a 100 MB one is a broken or hostile server, and 8 of them in flight were 2.5 GB of memory.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

#: Full-jitter exponential backoff: base * 2**(attempt-1), capped.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
#: Pool-wide cool-down after a 429 without Retry-After (it doubles while 429s keep coming).
COOLDOWN_BASE_S = 1.0
COOLDOWN_CAP_S = 60.0
#: A Retry-After above this is treated as this: a server asking for an hour is better
#: retried sooner than trusted blindly with a whole job idle.
RETRY_AFTER_CAP_S = 300.0

#: Compact the journal into a Parquet part every N results or T seconds, whichever first:
#: parts of a few thousand rows keep the file count low and each write cheap.
FLUSH_ROWS = 5000
FLUSH_SECONDS = 30.0
#: fsync the journal at most this often: survives power loss within a second, without an
#: fsync per row.
JOURNAL_FSYNC_S = 1.0

#: Results a resume re-sends because their request_hash is not the request their row would
#: send now (a damaged or copied part): past this many, the job (its settings, its input or
#: how requests are built) has changed as a whole, and re-sending everything would pay twice.
MAX_MISMATCHED_RESULTS = 10

#: Rows read from the input per batch.
READ_BATCH_ROWS = 2048
#: Bounded queue between reader and workers, as a multiple of concurrency: enough to keep
#: workers fed, small enough that memory does not grow with the dataset.
QUEUE_FACTOR = 4

#: A run's first request goes out alone; the others wait for its answer, so a wrong key, model
#: or URL costs one request, not a wave of CONCURRENCY. If it cannot connect this many times
#: (DNS failure, connection refused) the endpoint is unreachable: the job stops, exit 3.
FIRST_REQUEST_CONNECT_ATTEMPTS = 3
#: Fail-fast: when the first this-many results of a run are all the same non-retryable error
#: (same status, type, code and message), the job is misconfigured, not the rows: it stops
#: (exit 3) with those rows left pending. Few enough to cost little, enough not to stop a job
#: whose first rows happen to be bad. `--no-fail-fast` turns it off.
FAIL_FAST_RESULTS = 5

#: Seconds to let in-flight requests finish after Ctrl-C/SIGTERM before abandoning them.
STOP_GRACE_S = 15.0

#: A usage count above this is not real (no reply is a trillion tokens): the reply's usage is
#: unusable, not trusted; bounded so that millions of results still sum inside int64.
MAX_USAGE_TOKENS = 2**40

#: Seconds of each rate limit a job may send at once (`--burst`), by both the local limiter and the
#: limit a Ray job's tasks share; a job starts with nothing sent and paces after one burst. Providers
#: may enforce a per-minute limit per second (OpenAI: 60,000 RPM as 1,000 a second): a minute's worth
#: at once met 44% 429s there, and even a second's worth leaves such a server no room for a token
#: estimate's error (43% 429s at a told TPM, 0 at the RPM). Half a second keeps the other half as that
#: margin and costs nothing in the steady state (see docs/PERFORMANCE.md, "Bursts").
BURST_S = 0.5

#: Completion tokens assumed for the token limiter before any response calibrates it,
#: when max_tokens is not set.
COMPLETION_TOKENS_GUESS = 256
#: Largest width or precision a template's format spec may ask for (`{name:>N}`, `{name:.N}`):
#: wider pads no prompt usefully, and a huge one makes every row a body of that many characters.
TEMPLATE_MAX_WIDTH = 10_000
#: Largest request body sent: a row whose body is bigger fails alone, unsent. Far above any
#: context window of text (1M tokens is about 4 MB), room left for inline images.
MAX_REQUEST_BYTES = 32 * 1024 * 1024

#: Chat format overhead per message and per request (OpenAI's published counting rule).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REQUEST = 3
#: Longest piece of text handed to the tokenizer at once: it refuses a million characters, or
#: over 200,000 tokens, in one call; 40,000 characters make at most 160,000 tokens (4 per
#: character, one per UTF-8 byte) and keep a count's error to a token per 40,000 characters.
TOKENIZER_PIECE_CHARS = 40_000
#: Characters per token for the prompt estimate (a rough rule for English text).
CHARS_PER_TOKEN = 4.0

#: Completion tokens a request is assumed to reach, at worst, by `--max-cost` when it sets
#: no max_tokens (set max_tokens for a hard guarantee).
BUDGET_COMPLETION_CEILING = 4096

#: Progress line refresh interval.
PROGRESS_INTERVAL_S = 0.5

#: Rows per input shard (one Ray task each) with `--engine ray`: a task spends a second or
#: two starting, so a shard should keep its pool busy for minutes, and a lost task redoes
#: at most its unflushed results whatever its size.
SHARD_ROWS = 10_000
#: A shared limiter actor no job has asked for this long leaves the cluster.
SHARED_LIMITER_IDLE_S = 600.0
