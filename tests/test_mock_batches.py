"""The simulator's Files and Batches endpoints (batchhub/mock/batches.py), every object they return
parsed strictly with the official openai types."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion
from openai_shapes import openai_parse
from test_mock_server import AUTH, MODEL

from batchhub.mock import MockConfig, MockServer, SimulatorProcess
from batchhub.mock.batches import HUB

#: a batch runs through in a tenth of a second: each test stays well under a few seconds
FAST = {"batch_seconds": 0.1}


def line(custom_id: str, content: str = "Hello", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


class Api:
    """A client of one simulator's Files and Batches endpoints over a real aiohttp session."""

    def __init__(self, server: MockServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.base = f"http://127.0.0.1:{server.port}/v1"

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, headers=AUTH, **kwargs) as resp:
            data = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(data)
            return resp.status, data

    async def upload(self, data: bytes, purpose: str | None = "batch", filename: str = "in.jsonl") -> tuple[int, Any]:
        form = aiohttp.FormData()
        if purpose is not None:
            form.add_field("purpose", purpose)
        form.add_field("file", data, filename=filename, content_type="application/jsonl")
        return await self.call("POST", "/files", data=form)

    async def file_id(self, lines: list[Any]) -> str:
        status, body = await self.upload(jsonl(lines))
        assert status == 200, body
        return str(openai_parse(FileObject, body).id)

    async def create(self, file_id: str, **extra: Any) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **extra}
        status, data = await self.call("POST", "/batches", json=body)
        assert status == 200, data
        openai_parse(Batch, data)
        return dict(data)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        status, data = await self.call("GET", f"/batches/{batch_id}")
        assert status == 200, data
        openai_parse(Batch, data)
        return dict(data)

    async def finished(self, batch_id: str) -> dict[str, Any]:
        """The batch once its run has ended (waits on the run's task, not by polling)."""
        await asyncio.gather(*self.server.app[HUB].tasks)
        return await self.batch(batch_id)

    async def content(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        status, meta = await self.call("GET", f"/files/{file_id}")
        assert status == 200
        assert openai_parse(FileObject, meta).purpose == "batch_output"
        status, data = await self.call("GET", f"/files/{file_id}/content")
        assert status == 200
        return [json.loads(x) for x in data.decode().splitlines()]


@asynccontextmanager
async def api(**config: Any) -> AsyncIterator[Api]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        MockServer(MockConfig(**{**FAST, **config})) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        yield Api(server, session)


def assert_error(status: int, body: Any, expected: int, param: str | None = None) -> None:
    assert status == expected, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


# --- files -------------------------------------------------------------------


async def test_upload_retrieve_and_content_of_a_file() -> None:
    data = jsonl([line("a")])
    async with api() as client:
        status, body = await client.upload(data, filename="mine.jsonl")
        assert status == 200
        uploaded = openai_parse(FileObject, body)
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(data), "mine.jsonl")
        status, body = await client.call("GET", f"/files/{uploaded.id}")
        assert status == 200
        assert openai_parse(FileObject, body) == uploaded
        status, content = await client.call("GET", f"/files/{uploaded.id}/content")
        assert (status, content) == (200, data)


async def test_upload_refusals() -> None:
    async with api(file_max_bytes=100) as client:
        assert_error(*await client.upload(b"{}\n", purpose="fine-tune"), 400, "purpose")
        assert_error(*await client.upload(b"{}\n", purpose=None), 400, "purpose")
        assert_error(*await client.upload(b"x" * 101), 400, "file")
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("other", "x")
        assert_error(*await client.call("POST", "/files", data=form), 400, "file")
        assert (await client.upload(b"x" * 100))[0] == 200
        assert_error(*await client.call("GET", "/files/file-nope"), 404)
        assert_error(*await client.call("GET", "/files/file-nope/content"), 404)
        async with client.session.get(client.base + "/files/file-nope", headers={}) as resp:
            assert resp.status == 401
    assert client.server.stats.by_status == {400: 4, 200: 1, 404: 2, 401: 1}


# --- a batch's run -----------------------------------------------------------


async def test_a_batch_runs_to_completed_with_output_usage_and_counts() -> None:
    async with api(echo=True) as client:
        file_id = await client.file_id([line(f"r{i}", f"prompt {i}") for i in range(4)])
        created = await client.create(file_id, metadata={"job": "j1"})
        assert created["status"] == "validating"
        assert created["metadata"] == {"job": "j1"}
        assert created["expires_at"] == created["created_at"] + 24 * 3600
        done = await client.finished(created["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
        for name in ("in_progress_at", "finalizing_at", "completed_at"):
            assert done[name] >= done["created_at"]
        assert done["error_file_id"] is None
        output = await client.content(done["output_file_id"])
        assert [o["custom_id"] for o in output] == ["r0", "r1", "r2", "r3"]
        tokens = 0
        for i, out in enumerate(output):
            assert set(out) == {"id", "custom_id", "response", "error"}
            assert out["error"] is None
            assert out["response"]["status_code"] == 200
            assert out["response"]["request_id"].startswith("req_")
            completion = openai_parse(ChatCompletion, out["response"]["body"])
            assert completion.choices[0].message.content == f"echo: prompt {i}"
            assert completion.usage is not None
            tokens += completion.usage.total_tokens
        assert done["usage"]["total_tokens"] == tokens
        assert done["model"] == MODEL
        assert client.server.stats.completions == 4


async def test_invalid_bodies_are_lines_of_the_error_file_not_a_failed_batch() -> None:
    lines = [line("ok"), line("bad", temperature=7), line("long", max_tokens=100_000)]
    async with api() as client:
        created = await client.create(await client.file_id(lines))
        done = await client.finished(created["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
        assert [o["custom_id"] for o in await client.content(done["output_file_id"])] == ["ok"]
        errors = await client.content(done["error_file_id"])
        assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("bad", 400), ("long", 400)]
        assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
        assert errors[1]["response"]["body"]["error"]["code"] == "context_length_exceeded"
        assert client.server.stats.completions == 1


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        (b'{"custom_id": "a", "method": "POST"\n', "invalid_json_line"),
        (jsonl([line("a"), line("a")]), "duplicate_custom_id"),
        (jsonl([{**line("a"), "url": "/v1/embeddings"}]), "mismatched_endpoint"),
        (jsonl([{**line("a"), "method": "GET"}]), "invalid_method"),
        (jsonl([{k: v for k, v in line("a").items() if k != "custom_id"}]), "missing_required_parameter"),
        (jsonl([line(f"r{i}") for i in range(4)]), "too_many_requests"),
        (b"", "empty_file"),
        (jsonl([line("a")]) + b"\n" + jsonl([line("b")]), "invalid_json_line"),
        (jsonl([line("a"), line("b", model="gpt-4o")]), "mismatched_model"),
    ],
)
async def test_a_malformed_input_file_fails_the_batch(lines: bytes, code: str) -> None:
    async with api(batch_max_lines=3) as client:
        status, body = await client.upload(lines)
        assert status == 200
        created = await client.create(body["id"])
        done = await client.finished(created["id"])
        assert done["status"] == "failed"
        assert done["failed_at"] is not None
        assert code in [e["code"] for e in done["errors"]["data"]]
        assert (done["output_file_id"], done["error_file_id"], done["in_progress_at"]) == (None, None, None)
        assert client.server.stats.completions == 0


async def test_batch_fail_fault_fails_a_valid_batch() -> None:
    async with api(batch_fail=1.0) as client:
        done = await client.finished((await client.create(await client.file_id([line("a")])))["id"])
    assert done["status"] == "failed"
    assert done["errors"]["data"][0]["code"] == "invalid_request"


async def test_expiry_keeps_the_lines_answered_before_it() -> None:
    async with api(batch_expire=1.0, batch_expire_after=0.5) as client:
        created = await client.create(await client.file_id([line(f"r{i}") for i in range(10)]))
        done = await client.finished(created["id"])
        assert done["status"] == "expired"
        assert done["expired_at"] is not None and done["completed_at"] is None
        assert done["request_counts"] == {"total": 10, "completed": 5, "failed": 0}
        assert [o["custom_id"] for o in await client.content(done["output_file_id"])] == [f"r{i}" for i in range(5)]
        errors = await client.content(done["error_file_id"])
        assert [e["custom_id"] for e in errors] == [f"r{i}" for i in range(5, 10)]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        assert all(e["response"] is None for e in errors)


async def test_cancel_mid_way_keeps_what_finished() -> None:
    # 2 s for 20 lines: a line every 80 ms, time enough to cancel after the fifth
    async with api(batch_seconds=2.0) as client:
        created = await client.create(await client.file_id([line(f"r{i}") for i in range(20)]))
        await client.server.wait_until(lambda stats: stats.completions >= 5)
        running = await client.batch(created["id"])
        assert running["status"] == "in_progress" and running["in_progress_at"] is not None
        assert 5 <= running["request_counts"]["completed"] < 20
        assert running["request_counts"]["total"] == 20
        status, cancelling = await client.call("POST", f"/batches/{created['id']}/cancel")
        assert status == 200
        assert openai_parse(Batch, cancelling).status == "cancelling"
        done = await client.finished(created["id"])
        assert done["status"] == "cancelled"
        assert done["cancelling_at"] is not None and done["cancelled_at"] is not None
        answered = done["request_counts"]["completed"]
        assert 5 <= answered < 20
        assert answered == client.server.stats.completions
        output = await client.content(done["output_file_id"])
        assert [o["custom_id"] for o in output] == [f"r{i}" for i in range(answered)]
        errors = await client.content(done["error_file_id"])
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        assert len(errors) == 20 - answered
        # a finished batch is not cancelled again
        assert_error(*await client.call("POST", f"/batches/{created['id']}/cancel"), 400)


# --- creation refusals and the list --------------------------------------------


async def test_create_refusals() -> None:
    async with api() as client:
        file_id = await client.file_id([line("a")])
        base = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        cases: list[tuple[dict[str, Any], int, str | None]] = [
            ({**base, "endpoint": "/v1/embeddings"}, 400, "endpoint"),
            ({**base, "completion_window": "1h"}, 400, "completion_window"),
            ({**base, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
            ({**base, "metadata": {"k": 1}}, 400, "metadata"),
            ({**base, "input_file_id": "file-nope"}, 404, None),
            ({k: v for k, v in base.items() if k != "input_file_id"}, 400, "input_file_id"),
        ]
        for body, expected, param in cases:
            assert_error(*await client.call("POST", "/batches", json=body), expected, param)
        assert_error(*await client.call("GET", "/batches/batch_nope"), 404)
        assert_error(*await client.call("POST", "/batches/batch_nope/cancel"), 404)
        assert await client.create(file_id, metadata={f"k{i}": "v" for i in range(16)})


async def test_list_is_newest_first_and_pages() -> None:
    async with api(batch_seconds=0) as client:
        file_id = await client.file_id([line("a")])
        ids = [(await client.create(file_id))["id"] for _ in range(5)]
        newest = list(reversed(ids))
        status, page = await client.call("GET", "/batches", params={"limit": "2"})
        assert status == 200
        for batch in page["data"]:
            openai_parse(Batch, batch)
        assert [b["id"] for b in page["data"]] == newest[:2]
        assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == (
            "list",
            newest[0],
            newest[1],
            True,
        )
        seen = [b["id"] for b in page["data"]]
        while page["has_more"]:
            status, page = await client.call("GET", "/batches", params={"limit": "2", "after": page["last_id"]})
            assert status == 200
            seen += [b["id"] for b in page["data"]]
        assert seen == newest
        status, whole = await client.call("GET", "/batches")
        assert [b["id"] for b in whole["data"]] == newest and not whole["has_more"]
        assert_error(*await client.call("GET", "/batches", params={"limit": "0"}), 400, "limit")
        assert_error(*await client.call("GET", "/batches", params={"limit": "101"}), 400, "limit")
        await client.finished(ids[0])


# --- faults --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503"])
async def test_server_error_faults_on_every_batch_request(kind: str) -> None:
    async with api(batch_faults={kind: 1.0}) as client:
        assert_error(*await client.upload(jsonl([line("a")])), int(kind))
        body = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        assert_error(*await client.call("POST", "/batches", json=body), int(kind))
        assert_error(*await client.call("GET", "/batches/batch_x"), int(kind))
        assert_error(*await client.call("GET", "/files/file-x/content"), int(kind))
        assert not client.server.app[HUB].files and not client.server.app[HUB].batches
        assert client.server.stats.faults_injected == {kind: 4}


async def test_faults_are_drawn_by_probability() -> None:
    async with api(batch_faults={"503": 0.5}, seed=7) as client:
        statuses = [(await client.call("GET", "/files/file-x"))[0] for _ in range(200)]
    assert set(statuses) == {503, 404}
    assert 60 <= statuses.count(503) <= 140


async def test_timeout_fault_hangs_then_drops_the_connection() -> None:
    async with api(batch_faults={"timeout": 1.0}, hang_seconds=0.05) as client:
        with pytest.raises(aiohttp.ClientError):
            await client.call("GET", "/batches/batch_x")
    assert client.server.stats.faults_injected["timeout"] >= 1
    assert client.server.stats.by_status == {}


async def test_a_post_that_times_out_has_acted_its_answer_lost() -> None:
    # the upload stored its file and the create made its batch; only the answers were lost
    async with api(batch_faults={"timeout": 1.0}, hang_seconds=0.05) as client:
        with pytest.raises(aiohttp.ClientError):
            await client.upload(jsonl([line("a")]))
        hub = client.server.app[HUB]
        file_id = next(iter(hub.files))
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"job": "j1"},
        }
        with pytest.raises(aiohttp.ClientError):
            await client.call("POST", "/batches", json=body)
        await asyncio.gather(*hub.tasks)
        # aiohttp sends a POST again when a reused connection drops it: one or two batches
        assert 1 <= len(hub.batches) <= 2
        assert all(b.metadata == {"job": "j1"} and b.status == "completed" for b in hub.batches.values())


# --- settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"batch_seconds": -1}, "batch_seconds"),
        ({"batch_max_lines": 0}, "batch_max_lines"),
        ({"file_max_bytes": 1.5}, "file_max_bytes"),
        ({"batch_faults": {"reset": 0.1}}, "batch_faults"),
        ({"batch_faults": {"500": 0.7, "503": 0.7}}, "add up"),
        ({"batch_fail": 2}, "batch_fail"),
        ({"batch_expire": -0.1}, "batch_expire"),
        ({"batch_expire_after": True}, "batch_expire_after"),
    ],
)
def test_bad_batch_settings_are_refused(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MockConfig.from_dict(settings)


async def test_cancel_while_validating_answers_no_line() -> None:
    async with api(batch_seconds=2.0) as client:
        created = await client.create(await client.file_id([line(f"r{i}") for i in range(3)]))
        status, cancelling = await client.call("POST", f"/batches/{created['id']}/cancel")
        assert (status, cancelling["status"]) == (200, "cancelling")
        done = await client.finished(created["id"])
        assert done["status"] == "cancelled"
        assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
        assert done["output_file_id"] is None and done["in_progress_at"] is None
        errors = await client.content(done["error_file_id"])
        assert [e["custom_id"] for e in errors] == ["r0", "r1", "r2"]
    assert client.server.stats.completions == 0


async def test_mock_server_batch_seconds_option() -> None:
    with SimulatorProcess("--batch-seconds", "0.05") as sim:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", jsonl([line("a")]), filename="in.jsonl")
            async with session.post(f"{sim.base_url}/files", data=form, headers=AUTH) as resp:
                file_id = (await resp.json())["id"]
            create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            async with session.post(f"{sim.base_url}/batches", json=create, headers=AUTH) as resp:
                batch_id = (await resp.json())["id"]
            # another process: the test asks until the batch is done (0.05 s; at most 10 s)
            for _ in range(200):
                async with session.get(f"{sim.base_url}/batches/{batch_id}", headers=AUTH) as resp:
                    batch = openai_parse(Batch, await resp.json())
                if batch.status == "completed":
                    break
                await asyncio.sleep(0.05)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 1
