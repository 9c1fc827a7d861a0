"""`BatchAPI` (batchhub/batch_api.py) against the simulator's Files and Batches endpoints: every
object checked with the official openai types, every call through 5xx, 429, timeouts and cut
bodies, one batch per create, refusals raised at once, the key never in an error."""

from __future__ import annotations

import asyncio
import json
import random
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai.types import Batch, FileObject
from openai_shapes import openai_parse
from test_mock_batches import jsonl, line

from batchhub.batch_api import BatchAPI
from batchhub.errors import (
    AuthenticationError,
    BadResponseError,
    NotFoundError,
    RateLimitError,
    RequestRejected,
    ServerError,
    TransportError,
)
from batchhub.mock import MockConfig, MockServer, SimulatorProcess
from batchhub.mock.batches import HUB

KEY = "sk-batchapi-test-0123456789abcdefghij"
ENDPOINT = "/v1/chat/completions"


class RecordingAPI(BatchAPI):
    """A `BatchAPI` whose waits are recorded, not slept, and whose `find`s are kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slept: list[float] = []
        self.found: list[list[dict[str, Any]]] = []

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def find(self, metadata: dict[str, str]) -> list[dict[str, Any]]:
        batches = await super().find(metadata)
        self.found.append(batches)
        return batches


@asynccontextmanager
async def simulator(
    key: str = KEY,
    attempts: int = 8,
    page_size: int | None = None,
    client: type[RecordingAPI] = RecordingAPI,
    **config: Any,
) -> AsyncIterator[tuple[MockServer, RecordingAPI]]:
    settings = {"batch_seconds": 0.1, "api_key": KEY, "hang_seconds": 0.02, **config}
    async with (
        MockServer(MockConfig(**settings)) as server,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{server.port}/v1"
        api = client(session, base, key, timeout=10, attempts=attempts, backoff_base=0.001, rng=random.Random(0))
        if page_size is not None:
            api._page_size = page_size
        yield server, api


async def finished(server: MockServer) -> None:
    """Every batch's run ended (waits on the runs' tasks)."""
    await asyncio.gather(*server.app[HUB].tasks)


def input_file(tmp_path: Path, name: str, count: int = 3, content: str = "Hello") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl([line(f"r{i}", f"{content} {i}") for i in range(count)]))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# --- the calls -----------------------------------------------------------------------------------


async def test_upload_create_retrieve_download_cancel(tmp_path: Path) -> None:
    path = input_file(tmp_path, "in.jsonl", 4)
    async with simulator(echo=True) as (server, api):
        uploaded = openai_parse(FileObject, await api.upload(path, "job-part-1.jsonl"))
        size = path.stat().st_size
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", size, "job-part-1.jsonl")
        created = openai_parse(Batch, await api.create(uploaded.id, ENDPOINT, {"job": "j1", "part": "1"}))
        assert created.status == "validating"
        assert (created.input_file_id, created.endpoint, created.completion_window) == (uploaded.id, ENDPOINT, "24h")
        assert created.metadata == {"job": "j1", "part": "1"}
        await finished(server)
        done = openai_parse(Batch, await api.retrieve(created.id))
        assert done.status == "completed"
        assert done.output_file_id is not None
        dest = tmp_path / "out.jsonl"
        size = await api.download(done.output_file_id, dest)
        assert size == dest.stat().st_size == len(server.app[HUB].files[done.output_file_id].data)
        answers = [json.loads(x) for x in dest.read_text().splitlines()]
        assert [a["custom_id"] for a in answers] == ["r0", "r1", "r2", "r3"]
        assert answers[2]["response"]["body"]["choices"][0]["message"]["content"] == "echo: Hello 2"
        assert leftovers(tmp_path) == []

        server.app[HUB].state.config.batch_seconds = 5.0
        running = await api.create(uploaded.id, ENDPOINT, {"job": "j1", "part": "2"})
        cancelling = openai_parse(Batch, await api.cancel(running["id"]))
        assert cancelling.status == "cancelling"
        await finished(server)
        # cancelling a batch that has ended answers it as it is (the server refused with a 400)
        before = dict(server.stats.by_status)
        assert openai_parse(Batch, await api.cancel(running["id"])).status == "cancelled"
        assert server.stats.by_status[400] == before.get(400, 0) + 1
    assert api.slept == []


async def test_every_call_survives_server_errors_timeouts_and_cut_answers(tmp_path: Path) -> None:
    faults = {"500": 0.07, "502": 0.07, "503": 0.07, "504": 0.07, "timeout": 0.06, "cut": 0.06}
    async with simulator(batch_faults=faults, seed=5) as (server, api):
        for part in range(8):
            uploaded = await api.upload(input_file(tmp_path, f"in{part}.jsonl"), f"in{part}.jsonl")
            created = await api.create(uploaded["id"], ENDPOINT, {"job": "j1", "part": str(part)})
            openai_parse(Batch, created)
            await finished(server)
            done = await api.retrieve(created["id"])
            assert done["status"] == "completed"
            dest = tmp_path / f"out{part}.jsonl"
            await api.download(done["output_file_id"], dest)
            assert dest.read_bytes() == server.app[HUB].files[done["output_file_id"]].data
            assert (await api.cancel(created["id"]))["status"] == "completed"
        batches = list(server.app[HUB].batches.values())
        injected = dict(server.stats.faults_injected)
    # exactly one batch per create, though creates timed out or lost their answer after acting
    assert sorted(b.metadata["part"] for b in batches if b.metadata) == [str(p) for p in range(8)]
    assert len(batches) == 8
    recovered = [found for found in api.found if found]
    assert recovered, "no create lost its answer after making its batch: this seed does not test it"
    assert set(injected) == set(faults)
    assert sum(injected.values()) >= 10
    assert leftovers(tmp_path) == []


async def test_a_create_whose_answer_is_lost_returns_the_batch_it_made(tmp_path: Path) -> None:
    path = input_file(tmp_path, "in.jsonl")

    class CalmingAPI(RecordingAPI):
        """Every request times out (after acting) until the create looks for its batch."""

        async def find(self, metadata: dict[str, str]) -> list[dict[str, Any]]:
            server.app[HUB].state.config.batch_faults = {}
            return await super().find(metadata)

    async with simulator(client=CalmingAPI) as (server, api):
        file_id = (await api.upload(path, "in.jsonl"))["id"]
        # batches of other jobs, of this one with other metadata or another file, are not taken for it
        other_file = (await api.upload(path, "other.jsonl"))["id"]
        for other in ({"job": "j10", "part": "1"}, {"job": "j1", "part": "10"}, {"job": "j1"}):
            await api.create(file_id, ENDPOINT, other)
        await api.create(other_file, ENDPOINT, {"job": "j1", "part": "1"})
        server.app[HUB].state.config.batch_faults = {"timeout": 1.0}
        created = await api.create(file_id, ENDPOINT, {"job": "j1", "part": "1"})
        hub = server.app[HUB]
        mine = [b.id for b in hub.batches.values() if b.metadata == {"job": "j1", "part": "1"}]
        assert len(mine) == 2 and mine[-1] == created["id"]
        assert created["input_file_id"] == file_id
        assert len(hub.batches) == 5
        assert server.stats.faults_injected == {"timeout": 1}
        assert len(api.found) == 1
        await finished(server)


async def test_a_create_that_cannot_tell_whether_it_acted_stops_with_one_batch(tmp_path: Path) -> None:
    async with simulator() as (server, api):
        file_id = (await api.upload(input_file(tmp_path, "in.jsonl"), "in.jsonl"))["id"]
        server.app[HUB].state.config.batch_faults = {"timeout": 1.0}
        with pytest.raises(TransportError, match=r"create of a batch of file-.*looking for the batch .*list of"):
            await api.create(file_id, ENDPOINT, {"job": "j1", "part": "1"})
        # the first POST made its batch; the list failing, it was not posted again
        assert [b.metadata for b in server.app[HUB].batches.values()] == [{"job": "j1", "part": "1"}]
        await finished(server)


async def test_429_waits_the_retry_after(tmp_path: Path) -> None:
    async with simulator(batch_faults={"429": 0.5}, fault_retry_after_ms=2500, seed=1) as (server, api):
        uploaded = await api.upload(input_file(tmp_path, "in.jsonl"), "in.jsonl")
        created = await api.create(uploaded["id"], ENDPOINT, {"job": "j1"})
        for _ in range(6):
            await api.retrieve(created["id"])
        await finished(server)
        limited = server.stats.rate_limited
    assert limited >= 3
    assert api.slept == [2.5] * limited
    # a 429 did not act: the create posted again without looking for its batch
    assert api.found == []


async def test_a_bare_429_backs_off(tmp_path: Path) -> None:
    # Retry-After 0 here stands for none said: the wait is the backoff's
    async with simulator(batch_faults={"429": 1.0}, fault_retry_after_ms=0, attempts=3) as (server, api):
        with pytest.raises(RateLimitError, match=r"retrieve of batch_x: gave up after 3 attempts: .*Rate limit"):
            await api.retrieve("batch_x")
    assert server.stats.by_status == {429: 3}
    assert len(api.slept) == 2


@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        ("503", ServerError, "The engine is currently overloaded"),
        ("timeout", TransportError, "connection failed"),
        ("cut", TransportError, "cut off"),
    ],
)
async def test_attempts_run_out_with_an_error_naming_the_call(
    tmp_path: Path, fault: str, error: type[Exception], words: str
) -> None:
    path = input_file(tmp_path, "in.jsonl")
    async with simulator(batch_faults={fault: 1.0}, attempts=3) as (server, api):
        with pytest.raises(error, match=f"Batch API retrieve of batch_abc: gave up after 3 attempts: .*{words}"):
            await api.retrieve("batch_abc")
        with pytest.raises(error, match=f"Batch API upload of in.jsonl: gave up after 3 attempts: .*{words}"):
            await api.upload(path, "in.jsonl")
        dest = tmp_path / "out.jsonl"
        with pytest.raises(error, match="Batch API download of file-x: gave up after 3 attempts"):
            await api.download("file-x", dest)
        assert not dest.exists()
        with pytest.raises(error, match=r"Batch API create of a batch of file-x: .*list of batches: gave up after 3"):
            await api.create("file-x", ENDPOINT, {"job": "j1"})
    assert len(api.slept) == 2 * 4 + 1  # 2 waits per call; the create's first, then its list's 2
    if fault == "503":
        assert server.stats.by_status == {503: 3 * 3 + 1 + 3}


async def test_not_found_and_a_refused_key_are_raised_at_once(tmp_path: Path) -> None:
    async with simulator() as (server, api):
        with pytest.raises(NotFoundError) as lost:
            await api.retrieve("batch_nope")
        assert lost.value.status == 404
        assert lost.value.request_id is not None and lost.value.request_id.startswith("req_")
        assert str(lost.value) == (
            f"HTTP 404: Batch API retrieve of batch_nope: No batch found with id 'batch_nope'. "
            f"(request id {lost.value.request_id})"
        )
        with pytest.raises(NotFoundError, match="No such File object: file-nope"):
            await api.download("file-nope", tmp_path / "out.jsonl")
        with pytest.raises(NotFoundError, match="No such File object: file-nope"):
            await api.create("file-nope", ENDPOINT, {"job": "j1"})
        # an id the server quotes back holding the key: the key is not in the error
        with pytest.raises(NotFoundError) as quoted:
            await api.retrieve(f"batch_{KEY}")
        assert KEY not in str(quoted.value) and KEY[5:20] not in str(quoted.value)
        assert quoted.value.error_object is not None
        assert KEY[5:20] not in json.dumps(quoted.value.error_object)
        assert "[redacted]" in str(quoted.value)
        assert server.stats.by_status == {404: 4}
        assert not (tmp_path / "out.jsonl").exists() and leftovers(tmp_path) == []

    wrong = "sk-wrong-0123456789abcdefghij"
    async with simulator(key=wrong) as (server, api):
        with pytest.raises(AuthenticationError) as refused:
            await api.upload(input_file(tmp_path, "in.jsonl"), "in.jsonl")
        assert refused.value.status == 401
        assert "the API key was refused: Incorrect API key provided." in str(refused.value)
        assert wrong not in str(refused.value) and KEY not in str(refused.value)
        assert server.stats.by_status == {401: 1}
    assert api.slept == []


async def test_a_file_the_server_refuses_is_raised_at_once(tmp_path: Path) -> None:
    async with simulator(file_max_bytes=100) as (server, api):
        with pytest.raises(RequestRejected, match=r"upload of big.jsonl: File is too large"):
            await api.upload(input_file(tmp_path, "big.jsonl", 5), "big.jsonl")
        with pytest.raises(RequestRejected, match="'/v1/embeddings' is not one of"):
            await api.create("file-x", "/v1/embeddings", {"job": "j1"})
    assert server.stats.by_status == {400: 2}


# --- find ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [None, 7])
async def test_find_reads_every_page_and_matches_metadata_exactly(tmp_path: Path, page_size: int | None) -> None:
    async with simulator(batch_seconds=0, page_size=page_size) as (server, api):
        file_id = (await api.upload(input_file(tmp_path, "in.jsonl", 1), "in.jsonl"))["id"]
        metadata = [
            {"job": "j1", "part": str(i)}
            if i % 3 == 0
            else {"job": "j10", "part": str(i)}
            if i % 3 == 1
            else {"job": "J1", "x": "j1"}
            for i in range(120)
        ]
        ids = [(await api.create(file_id, ENDPOINT, m))["id"] for m in metadata]
        await api.create(file_id, ENDPOINT, {})
        await api.create(file_id, ENDPOINT, {"job": "j1 "})
        lists_before = server.stats.by_status[200]
        found = await api.find({"job": "j1"})
        assert [b["id"] for b in found] == [ids[i] for i in reversed(range(0, 120, 3))]
        for batch in found:
            openai_parse(Batch, batch)
        pages = server.stats.by_status[200] - lists_before
        assert pages == -(-122 // (page_size or 100))
        assert [b["id"] for b in await api.find({"job": "j1", "part": "9"})] == [ids[9]]
        assert await api.find({"job": "j1", "part": "1"}) == []
        assert len(await api.find({})) == 122
        await finished(server)


# --- download ------------------------------------------------------------------------------------


async def test_a_large_output_downloads_whole_through_cut_answers(tmp_path: Path) -> None:
    path = input_file(tmp_path, "in.jsonl", 400, content="x" * 8000)
    async with simulator(echo=True, max_context_tokens=100_000) as (server, api):
        created = await api.create((await api.upload(path, "in.jsonl"))["id"], ENDPOINT, {"job": "j1"})
        await finished(server)
        done = await api.retrieve(created["id"])
        assert done["request_counts"] == {"total": 400, "completed": 400, "failed": 0}
        whole = server.app[HUB].files[done["output_file_id"]].data
        assert len(whole) > 3_000_000
        dest = tmp_path / "out.jsonl"
        dest.write_bytes(b"the file before\n")
        server.app[HUB].state.config.batch_faults = {"cut": 1.0}
        with pytest.raises(TransportError, match=r"download of file-.*gave up after 8 attempts"):
            await api.download(done["output_file_id"], dest)
        # no partial download stands at dest, and none is left beside it
        assert dest.read_bytes() == b"the file before\n"
        assert leftovers(tmp_path) == []
        server.app[HUB].state.config.batch_faults = {"cut": 0.6}
        for _ in range(3):
            assert await api.download(done["output_file_id"], dest) == len(whole)
            assert dest.read_bytes() == whole
    assert server.stats.faults_injected["cut"] >= 8 + 2
    assert leftovers(tmp_path) == []


def test_upload_and_download_stream_without_holding_the_file(tmp_path: Path) -> None:
    size = 24 * 1024 * 1024
    path = tmp_path / "in.jsonl"
    with path.open("wb") as out:
        for i in range(size // (1024 * 1024)):
            out.write(bytes([48 + i % 10]) * (1024 * 1024 - 1) + b"\n")

    async def both(base_url: str) -> tuple[int, int]:
        async with aiohttp.ClientSession() as session:
            api = BatchAPI(session, base_url, KEY, timeout=60)
            await api.upload(path, "warm.jsonl")  # the first call's imports and connection are not counted
            tracemalloc.start()
            try:
                file_id = (await api.upload(path, "in.jsonl"))["id"]
                got = await api.download(file_id, tmp_path / "copy.jsonl")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return got, peak

    # the simulator in a process of its own: its copy of the file is not counted here
    with SimulatorProcess("--api-key", KEY) as sim:
        got, peak = asyncio.run(both(sim.base_url))
    assert got == size
    assert (tmp_path / "copy.jsonl").read_bytes() == path.read_bytes()
    assert peak < size / 4, f"{peak} bytes allocated at the peak for a {size}-byte file"


# --- replies that are not what the API documents ---------------------------------------------------


async def test_a_reply_that_is_not_json_or_not_the_object_is_a_clear_error() -> None:
    calls: list[str] = []

    async def reply(request: web.Request) -> web.Response:
        calls.append(request.match_info["batch_id"])
        if request.match_info["batch_id"] == "batch_html":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        return web.json_response({"object": "batch", "status": "completed"})

    app = web.Application()
    app.router.add_get("/v1/batches/{batch_id}", reply)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            api = RecordingAPI(session, f"http://127.0.0.1:{port}/v1", KEY, attempts=2, backoff_base=0.001)
            with pytest.raises(BadResponseError, match=r"retrieve of batch_html: .*the reply is not JSON .*<html>"):
                await api.retrieve("batch_html")
            with pytest.raises(BadResponseError, match=r"retrieve of batch_x: .*not a Batch object: no 'id'"):
                await api.retrieve("batch_x")
    finally:
        await runner.cleanup()
    assert calls == ["batch_html"] * 2 + ["batch_x"] * 2


# --- the simulator's faults this client is tested against ----------------------------------------


async def test_simulator_cut_and_429_faults() -> None:
    async with MockServer(MockConfig(batch_faults={"429": 1.0}, fault_retry_after_ms=1500)) as server:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {KEY}"}
            url = f"http://127.0.0.1:{server.port}/v1"
            async with session.get(f"{url}/batches/batch_x", headers=headers) as resp:
                assert resp.status == 429
                assert (resp.headers["Retry-After"], resp.headers["retry-after-ms"]) == ("2", "1500")
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
            server.app[HUB].state.config.batch_faults = {"cut": 1.0}
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", jsonl([line("a")]), filename="in.jsonl")
            async with session.post(f"{url}/files", data=form, headers=headers) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        # the cut upload acted: its file is stored
        assert len(server.app[HUB].files) == 1
        assert server.stats.faults_injected == {"429": 1, "cut": 1}


async def test_a_deleted_file_is_gone_and_deleting_it_again_is_no_error(tmp_path: Path) -> None:
    path = input_file(tmp_path, "in.jsonl", 2)
    async with simulator() as (server, api):
        uploaded = await api.upload(path, "in.jsonl")
        await api.delete_file(uploaded["id"])
        assert uploaded["id"] not in server.app[HUB].files
        await api.delete_file(uploaded["id"])  # a 404: what was asked is so
        with pytest.raises(NotFoundError):
            await api.download(uploaded["id"], tmp_path / "gone.jsonl")
        assert server.stats.by_status[404] == 2
