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
#: A fixed number, not "auto", also when no limit is given: against a rate-limited provider
#: auto does no better (benchmarks/capacity.py: 99.9-100.2% of a 1,200 rpm limit against
#: 100.0% for 32, told it or not), its signal (latency) moves there with the provider's other
#: customers, and a fixed number bounds what a hard kill can make the job pay twice.
#: `--concurrency auto` is for a self-hosted server with a capacity (README, "Self-hosted servers").
CONCURRENCY = 32
#: The most requests in flight a job may ask for: each is an open connection and a worker,
#: and no endpoint serves more from one client usefully; far more exhausts file descriptors.
MAX_CONCURRENCY = 1000
#: `--concurrency auto` (batchhub/concurrency.py): the limit starts here and doubles while the
#: latency stays flat, so a server that serves a few at once is not flooded before it is measured,
#: and one that serves hundreds is reached in a few round trips.
AUTO_CONCURRENCY_INITIAL = 4
#: ... and never goes past MAX_CONCURRENCY (its ceiling: the connector allows as many connections).
#: A round's mean latency may be this many times the no-load latency before the limit shrinks: a
#: batching server is slower at its full batch than alone (vLLM, TGI: 1.2-2x), and the limit must
#: not stop short of the capacity for that. 1.5 stopped at 0.81-0.9 of the best throughput against
#: a server twice as slow at its full batch; 1.75 reached 0.96, with a queue on the server of
#: about 0.75 x its capacity at worst (one that does not slow down with load at all); 2 queues more.
AUTO_CONCURRENCY_TOLERANCE = 1.75
#: Latency samples per round at least (a round is also at least `limit` samples): one reply's
#: latency varies with its length, the mean of 16 is within about 7% of the true mean.
AUTO_CONCURRENCY_ROUND = 16
#: After a timeout, a 503 or a 504 the limit is multiplied by this (once per round): they mean the
#: server is past its capacity, and a timed-out request cost `timeout` seconds of a slot.
AUTO_CONCURRENCY_BACKOFF = 0.5
#: Every this many rounds the limit halves for one round to measure the no-load latency again (it
#: may have changed with the prompts); costs about one round's half in 30.
AUTO_CONCURRENCY_PROBE_ROUNDS = 30
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

#: Allocations between collections of the youngest generation in a `batchhub run` process (Python's
#: is 700): a request makes hundreds of short-lived objects, and with Python's settings the
#: collector took ~10% of a job's CPU; at 20,000 cyclic garbage (an exception and its traceback)
#: still goes within a fraction of a second at any useful rate, and peak RSS did not grow.
GC_GEN0_THRESHOLD = 20_000

#: genai-prices answers saved between jobs (pricing.SavedPrices) at most, one per model and day
#: (~150 bytes each): the file is read at every job's start, so it starts afresh past this.
SAVED_PRICES_MAX = 1000

#: Full-jitter exponential backoff: base * 2**(attempt-1), capped.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
#: Learning a requests limit from bare 429s (no limit headers, no Retry-After): see
#: `batchhub.learned_rate`. Slots of a quarter second count what was sent and refused: short
#: enough that a stretch of 429s is seen within a second or two, long enough to hold a few
#: requests at a few hundred a minute.
LEARN_SLOT_S = 0.25
#: Seconds of 429s in every slot (after the burst's slot) before the accepted rate is trusted
#: as the limit: a second holds 20 replies at 1,200 a minute, enough for a 5% measurement.
LEARN_MEASURE_S = 0.5
#: The first bare 429 sets the rate to this share of what was sent over the last second: that
#: second was a burst which ran into the limit, often many times above it (a burst is what a
#: job told nothing sends); from there the rate doubles every LEARN_SLOW_START_S until a 429.
LEARN_FIRST_CUT = 0.15
#: A later 429 with no trusted measurement cuts the rate by this: a limit just crossed by
#: the probe is a few percent below, and a deeper cut costs throughput until the probe is back.
LEARN_CUT = 0.9
#: A cut to a measured limit goes this far below it, so the server's bucket refills a little
#: and the next few requests' jitter does not meet a 429.
LEARN_MARGIN = 0.03
#: The probe doubles the rate after this many seconds without a 429 (x1.19 after half, x16
#: after twice): a raised limit is found within a minute, a lowered one met gently.
LEARN_PROBE_S = 20.0
#: After the first cut (made on little evidence) the rate doubles every this many seconds
#: until a 429 says where the limit is: from a tenth of it, the limit is met in 3-4 s.
LEARN_SLOW_START_S = 1.0
#: Seconds a 429 takes to come back, beyond the last reservation made when the rate was cut:
#: the 429s of those requests belong to the cut already made.
LEARN_GRACE_S = 0.25
#: The probe goes no higher than this times the rate really sent over the last second.
LEARN_HEADROOM = 1.5
#: The learned rate never goes below this (one request every 10 s): a limit lower than that
#: is a free tier, for which `--rpm` is the way.
LEARN_FLOOR_RPM = 6.0
#: Replies in a row whose `x-ratelimit-limit-*` header says more than the job paces by before the
#: job follows it up (a lower one is followed at once): rows of several models get each model's
#: headers in turn, and one model's larger limit must not loosen another's for a reply.
HEADER_RAISE_REPLIES = 20
#: The largest count of a limit, told (--rpm, --tpm, --rps) or in a header: no provider counts to
#: 10**15 a minute, and the limiter's arithmetic needs a float of it.
MAX_LIMIT_COUNT = 10**15
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

#: The ok replies a run keeps in memory, by request hash, for later rows that ask the same (batchhub/reuse.py):
#: a row asking what another asked longer ago finds it in the job's results or the reply cache.
REUSE_RECENT = 10_000

#: Rows read from the input per batch.
READ_BATCH_ROWS = 2048
#: A new job's input up to this size is read through (counted, every row checked) before anything
#: is sent or written: about 0.1 s of a 1M-row file's 1.5 s, so a bad small file is refused at
#: once. A larger one is checked while the job sends, so its first request does not wait for
#: the whole file; the job stops at its first bad row (batchhub/input_check.py).
INPUT_CHECK_AHEAD_BYTES = 4 * 1024 * 1024
#: The nice value of the thread that checks a large input while the job runs (Linux): the
#: job's own threads come first on a busy machine, the check takes what CPU they leave.
INPUT_CHECK_NICE = 10
#: A gzipped input's size counts this many times towards INPUT_CHECK_AHEAD_BYTES (text
#: compresses about so much, and the check reads it decompressed).
GZIP_SIZE_FACTOR = 5
#: Bounded queue between reader and workers, as a multiple of concurrency: enough to keep
#: workers fed, small enough that memory does not grow with the dataset. Under
#: `--concurrency auto` it is MAX_CONCURRENCY rows, one per worker the limit may let go at
#: once (as a fixed pool of 250 has), whatever the limit is now.
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

# -- the reply cache (batchhub/reply_cache.py) ----------------------------------------------------

#: Seconds a reply waits before the cache writer puts it: one transaction (one WAL append and, with
#: synchronous=NORMAL, no fsync) per half second costs nothing next to the requests, and a kill
#: loses at most this much of the cache, never of the job (its journal has every reply).
CACHE_FLUSH_S = 0.5
#: Replies that make the cache writer put at once, without waiting CACHE_FLUSH_S: a transaction of
#: 1,000 small replies takes some milliseconds, short enough for another process waiting to write.
CACHE_FLUSH_ENTRIES = 1000
#: Seconds a cache write (or a lookup during a checkpoint) waits for another process's transaction:
#: two jobs writing the same cache each hold it some milliseconds per write, so 10 s only runs out
#: when something is wrong; then the cache is off for the run (the job goes on, sending).
CACHE_BUSY_TIMEOUT_S = 10.0
#: Keys per `WHERE key IN (...)` of a lookup: under every SQLite's variable limit (999 before 3.32),
#: large enough that one statement per 500 keys costs nothing next to the rows it reads.
CACHE_LOOKUP_CHUNK = 500
#: Bytes counted per cache entry besides its data, endpoint and model (key index ~27, row header,
#: id, created, size, checksum ~40): `prune --max-size` counts these, so the file ends near that size.
CACHE_ENTRY_OVERHEAD_BYTES = 70

# -- the Batch API (`--via batch`, batchhub/batch_run.py) -----------------------------------------

#: Requests per batch input file: OpenAI's limit per batch (50,000); a provider with a lower one is
#: told with `batch_requests`.
BATCH_REQUESTS = 50_000
#: Bytes per batch input file: OpenAI's limit for a file uploaded with purpose "batch" ("200 MB"), read
#: as 200,000,000 bytes: a file within it is within the limit however the provider counts a megabyte.
BATCH_BYTES = 200_000_000
#: The window a batch is created with: the only one OpenAI offers.
BATCH_COMPLETION_WINDOW = "24h"
#: Seconds before a live batch is polled first, and the factor each poll that finds it unchanged
#: waits longer, up to `batch_poll` (BATCH_POLL_S): a batch of a few requests can end in seconds, one
#: of 50,000 takes minutes to hours, and a minute between polls of a batch that takes hours costs
#: a request a minute and at most a minute of waiting after it ends.
BATCH_POLL_FIRST_S = 1.0
BATCH_POLL_FACTOR = 1.5
BATCH_POLL_S = 60.0
#: Attempts of one Files or Batches API call (upload, create, poll, download, list, cancel) that
#: fails with a 5xx, a 429, a timeout or a broken connection, with the job's backoff between them:
#: the batch itself is safe on the server, and a call that keeps failing stops the run (resumable).
BATCH_CALL_ATTEMPTS = 8
#: Seconds one Files or Batches API call may take (an upload or a download of 200 MB included).
BATCH_CALL_TIMEOUT_S = 600.0
#: The published discount of a provider's Batch API when the price source has no batch price of a
#: model: OpenAI, Anthropic, Google, Mistral and Groq all bill a batch at half the live price.
BATCH_DISCOUNT = 0.5

# -- object storage (s3://, gs://: batchhub/objstore.py, batchhub/remote_job.py) ------------------

#: Seconds to open a connection to the store: a store that does not answer in this is down or not
#: there, and the user hears so in one line rather than after minutes.
STORAGE_CONNECT_TIMEOUT_S = 10.0
#: Seconds one storage request may take: a part (a few MB) or a page of a listing takes well under one.
STORAGE_REQUEST_TIMEOUT_S = 60.0
#: Attempts of one storage call (the AWS SDK's standard retry: 5xx, throttling, dropped connections).
STORAGE_ATTEMPTS = 5
#: Bytes per read and write when a file is copied to or from the store.
STORAGE_CHUNK_BYTES = 8 * 1024 * 1024
#: Seconds a job's lease in a bucket (`job.lock`) stays valid without being renewed: a run renews it
#: every quarter of this; a run on another host killed without releasing it holds its job this long.
STORAGE_LEASE_S = 60.0
#: Seconds between writing a lease and reading it back to see that it is still ours: longer than one
#: write takes, so of two runs taking the lease at once, one sees the other's and refuses.
STORAGE_LEASE_SETTLE_S = 1.0
