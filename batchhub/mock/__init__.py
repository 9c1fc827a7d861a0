"""The built-in simulated endpoint: an OpenAI-compatible Chat Completions server.

It answers deterministically (content is a function of the seed and the
request), enforces requests- and tokens-per-minute limits with OpenAI's
headers and errors, and injects faults (5xx, hangs, dropped connections,
truncated or garbled bodies, cut streams) with seeded probabilities. The demo,
the tests and the benchmarks run against it::

    async with MockServer(MockConfig(rpm=600, faults={"503": 0.05})) as srv:
        ...  # point a client at srv.base_url; srv.stats counts what it saw

With `MockConfig(echo=True)` (``--echo``) each reply is ``echo: `` + its request's
last user message, and `srv.prompts_seen` lists the last user messages of the
completions served, in order (``GET /mock/prompts``, `SimulatorProcess.prompts_seen()`).

In a process of its own (a job run as a subprocess, a benchmark)::

    with SimulatorProcess("--rpm", "600", "--seed", "3") as sim:
        ...  # sim.base_url; sim.stats() reads GET /mock/stats

Modules: `config` (settings and counters), `validation` (the request body),
`schemas` (its tools, tool_choice and response_format), `invalid` (the 400
error and its wording), `tokens` (token counting and the deterministic
answers), `replies` (schema instances, tool calls and logprobs of an answer),
`ratelimit` (the buckets), `state` (what a running endpoint keeps), `app` (the
HTTP handlers: a request's way from auth to answer), `batches` (the Batch
API's files and batches, a batch's run at the pace of `batch_seconds`), `batch_routes`
(the Files and Batches endpoints), `responses` (bodies,
streams, error bodies and broken answers), `server` (listening on a port),
`process` (the simulator in a process of its own).
"""

from batchhub.mock.app import make_app
from batchhub.mock.config import FAULT_KINDS, MockConfig, MockStats
from batchhub.mock.process import SimulatorProcess
from batchhub.mock.server import MockServer, serve_forever

__all__ = ["FAULT_KINDS", "MockConfig", "MockServer", "MockStats", "SimulatorProcess", "make_app", "serve_forever"]
