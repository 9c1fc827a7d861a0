"""The reply cache store (batchhub.reply_cache): pay once, never trust a damaged entry, never raise into a job.

Two real processes writing one cache, a writer SIGKILLed mid-transaction, and files damaged on
purpose (bytes overwritten, truncated, not a database at all) are all here; so are the CLI's
`batchhub cache` and `batchhub cache prune`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jobprocs import REPO, child_env

from batchhub.cache_text import parse_age, parse_size
from batchhub.cache_writer import CacheWriter
from batchhub.cli import main
from batchhub.errors import UsageError
from batchhub.reply_cache import FILE_NAME, ReplyCache, checksum, encode_entry


def key_of(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}request {i}".encode()).hexdigest()[:32]


def reply_of(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "content": f"answer to request {i}",
        "finish_reason": "stop",
        "extra": json.dumps({"created": 1_700_000_000 + i}),
        "model": model,
        "response_id": f"chatcmpl-{i}",
        "request_id": None,
        "prompt_tokens": 10 + i % 7,
        "completion_tokens": 5,
        "total_tokens": 15 + i % 7,
        "cached_tokens": None,
        "latency_s": 0.25,
        "http_status": 200,
        "finished_at": 1_700_000_000.5 + i,
    }


def entries(n: int, start: int = 0, model: str = "gpt-4o-mini") -> list[tuple[str, str, str | None, dict[str, Any]]]:
    return [(key_of(i), "api.example.com", model, reply_of(i, model)) for i in range(start, start + n)]


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    opened = ReplyCache.open(tmp_path / "cache")
    assert opened.problem is None
    yield opened
    opened.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# -- put and get ---------------------------------------------------------------------------------


def test_a_reply_put_is_found_by_its_key_and_a_miss_is_absent(cache: ReplyCache) -> None:
    cache.put_many(entries(50))
    found = cache.get_many([key_of(i) for i in range(60)])
    assert found == {key_of(i): reply_of(i) for i in range(50)}
    assert cache.damaged == 0
    assert cache.get_many([]) == {}


def test_pay_once_the_first_reply_stays_unless_replace(cache: ReplyCache) -> None:
    cache.put_many(entries(1))
    second = dict(reply_of(0), content="a later answer")
    cache.put_many([(key_of(0), "api.example.com", "gpt-4o-mini", second)])
    assert cache.get_many([key_of(0)])[key_of(0)]["content"] == "answer to request 0"
    cache.put_many([(key_of(0), "api.example.com", "gpt-4o-mini", second)], replace=True)
    assert cache.get_many([key_of(0)])[key_of(0)]["content"] == "a later answer"
    assert cache.info().entries == 1


def test_a_key_that_is_not_a_request_hash_is_refused(cache: ReplyCache) -> None:
    for bad in ("ABCDEF" * 6, "12", key_of(0) + "0", "zz" * 16):
        with pytest.raises(ValueError, match="32 lowercase hex"):
            cache.get_many([bad])
        with pytest.raises(ValueError, match="32 lowercase hex"):
            cache.put_many([(bad, "h", "m", reply_of(0))])


def test_a_reply_with_a_value_no_reply_holds_is_refused_at_put(cache: ReplyCache) -> None:
    for field, value in (("extra", {"created": 1}), ("prompt_tokens", 1.5), ("content", 3), ("http_status", True)):
        with pytest.raises(ValueError, match=f"reply's {field} is"):
            cache.put_many([(key_of(0), "h", "m", dict(reply_of(0), **{field: value}))])
    cache.put_many([(key_of(0), "h", "m", {"content": "only some fields"})])  # the others are None
    assert cache.get_many([key_of(0)])[key_of(0)]["finish_reason"] is None


def test_lookups_and_a_write_from_threads_at_once(cache: ReplyCache) -> None:
    cache.put_many(entries(500))
    errors: list[BaseException] = []
    results: list[int] = []

    def look() -> None:
        try:
            for _ in range(20):
                results.append(len(cache.get_many([key_of(i) for i in range(1000)])))
        except BaseException as exc:  # pragma: no cover - shown by the assertion below
            errors.append(exc)

    def write() -> None:
        try:
            for start in range(500, 1000, 50):
                cache.put_many(entries(50, start))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=look), threading.Thread(target=look), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(500 <= n <= 1000 for n in results)
    assert len(cache.get_many([key_of(i) for i in range(1000)])) == 1000
    assert cache.problem is None


# -- damaged entries -----------------------------------------------------------------------------


def test_an_entry_whose_checksum_fails_is_not_returned_counted_deleted_and_replaced(cache: ReplyCache) -> None:
    cache.put_many(entries(3))
    with raw(cache.path) as conn:
        data = conn.execute("SELECT data FROM replies WHERE key = ?", (bytes.fromhex(key_of(1)),)).fetchone()[0]
        flipped = data.replace(b"answer to request 1", b"answer to request 2")
        conn.execute("UPDATE replies SET data = ? WHERE key = ?", (flipped, bytes.fromhex(key_of(1))))
    found = cache.get_many([key_of(i) for i in range(3)])
    assert set(found) == {key_of(0), key_of(2)}
    assert cache.damaged == 1
    with raw(cache.path) as conn:
        assert conn.execute("SELECT count(*) FROM replies").fetchone()[0] == 2
    cache.put_many(entries(3))  # the request is sent again and its reply put: it takes the place
    assert cache.get_many([key_of(1)]) == {key_of(1): reply_of(1)}


@pytest.mark.parametrize(
    "make_data",
    [
        pytest.param(lambda key: encode_entry(key_of(99), reply_of(99)), id="names another key"),
        pytest.param(lambda key: b"not json", id="not JSON"),
        pytest.param(lambda key: json.dumps([key, {"content": "x"}]).encode(), id="fields missing"),
        pytest.param(
            lambda key: json.dumps([key, dict(reply_of(0), prompt_tokens="ten")]).encode(), id="a field's type"
        ),
        pytest.param(lambda key: json.dumps({"key": key}).encode(), id="not a pair"),
    ],
)
def test_data_that_is_not_this_keys_reply_is_damaged_even_with_a_valid_checksum(
    cache: ReplyCache, make_data: Any
) -> None:
    cache.put_many(entries(2))
    key = bytes.fromhex(key_of(0))
    data = make_data(key_of(0))
    with raw(cache.path) as conn:
        conn.execute("UPDATE replies SET data = ?, checksum = ? WHERE key = ?", (data, checksum(key, data), key))
    assert cache.get_many([key_of(0), key_of(1)]) == {key_of(1): reply_of(1)}
    assert cache.damaged == 1


def test_an_entry_stored_under_the_wrong_key_is_never_served(cache: ReplyCache) -> None:
    """A row copied under another key, its checksum recomputed for that key: the data still names its own."""
    cache.put_many(entries(1))
    other = bytes.fromhex(key_of(5))
    data = encode_entry(key_of(0), reply_of(0))
    with raw(cache.path) as conn:
        conn.execute(
            "INSERT INTO replies (key, created, endpoint, model, size, checksum, data) "
            "VALUES (?, 0, 'h', 'm', 1, ?, ?)",
            (other, checksum(other, data), data),
        )
    assert cache.get_many([key_of(5)]) == {}
    assert cache.damaged == 1


# -- the file cannot be used: `problem`, never an exception ----------------------------------------


def test_a_folder_that_is_a_file_or_cannot_be_created_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    folders = (tmp_path / "file", tmp_path / "file" / "below", Path("/proc/batchhub-no-such-folder"), tmp_path / "a\0b")
    for folder in folders:
        opened = ReplyCache.open(folder)
        assert opened.problem is not None and "cannot" in opened.problem, opened.problem
        assert opened.get_many([key_of(0)]) == {}
        opened.put_many(entries(1))  # nothing, no exception
        assert opened.prune(model="m") == 0
        opened.close()


def test_a_cache_file_that_is_a_folder_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).mkdir()
    opened = ReplyCache.open(tmp_path)
    assert opened.problem is not None
    assert opened.get_many([key_of(0)]) == {}


def test_a_file_that_is_not_a_database_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(os.urandom(8192))
    opened = ReplyCache.open(tmp_path)
    assert opened.problem is not None and "damaged" in opened.problem, opened.problem
    assert opened.get_many([key_of(0)]) == {}
    opened.put_many(entries(1))


def test_another_sqlite_file_is_not_taken_for_a_cache(tmp_path: Path) -> None:
    with raw(tmp_path / FILE_NAME) as conn:
        conn.execute("CREATE TABLE replies (key TEXT, data TEXT)")
    opened = ReplyCache.open(tmp_path)
    assert opened.problem is not None and "not a batchhub reply cache" in opened.problem
    opened.put_many(entries(1))
    with raw(tmp_path / FILE_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM replies").fetchone()[0] == 0


def test_a_cache_of_another_version_is_left_alone(cache: ReplyCache) -> None:
    with raw(cache.path) as conn:
        conn.execute("PRAGMA user_version = 99")
    opened = ReplyCache.open(cache.path.parent)
    assert opened.problem is not None and "another version (99" in opened.problem
    opened.close()


def fill_and_close(folder: Path, n: int) -> Path:
    """A cache of n entries, checkpointed into its main file (no WAL left), closed."""
    opened = ReplyCache.open(folder)
    for start in range(0, n, 500):
        opened.put_many(entries(min(500, n - start), start))
    opened.close()
    with raw(opened.path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return opened.path


def use_everything(folder: Path, n: int) -> ReplyCache:
    """Open, look every key up, put, read the figures: what a job and `batchhub cache` do."""
    opened = ReplyCache.open(folder)
    found = opened.get_many([key_of(i) for i in range(n)])
    for key, reply in found.items():  # whatever is served is exactly what was put for that key
        assert reply == reply_of(int(next(i for i in range(n) if key_of(i) == key)))
    opened.put_many(entries(10, n))
    opened.info()
    opened.get_many([key_of(i) for i in range(n)])
    return opened


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8])
def test_bytes_overwritten_in_the_middle_of_the_file_are_noticed_never_raised(tmp_path: Path, where: float) -> None:
    path = fill_and_close(tmp_path, 3000)
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # one whole page of noise
        fh.seek(int(size * where) // 4096 * 4096)
        fh.write(random.Random(int(where * 10)).randbytes(4096))
    opened = use_everything(tmp_path, 3000)
    assert opened.problem is not None or opened.damaged > 0, "the damage went unnoticed"
    if opened.problem is not None:
        assert "damaged" in opened.problem and str(path) in opened.problem
        assert opened.get_many([key_of(0)]) == {}  # off for the rest of the run
    opened.close()


def test_a_few_bytes_changed_inside_a_reply_on_disk_are_caught_by_its_checksum(tmp_path: Path) -> None:
    path = fill_and_close(tmp_path, 3000)
    data = path.read_bytes()
    at = data.index(b'answer to request 1500"')
    path.write_bytes(data[:at] + b"ANSWER" + data[at + 6 :])  # still a valid page, still valid JSON
    opened = use_everything(tmp_path, 3000)
    assert opened.problem is None
    assert opened.damaged == 1
    opened.close()


def test_a_truncated_file_is_noticed_never_raised(tmp_path: Path) -> None:
    path = fill_and_close(tmp_path, 3000)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    opened = use_everything(tmp_path, 3000)
    assert opened.problem is not None and "damaged" in opened.problem, opened.problem
    opened.close()


# -- two processes, and a kill ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from test_reply_cache import entries
    from batchhub.reply_cache import ReplyCache

    folder, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cache = ReplyCache.open(folder)
    if sys.argv[5:] == ["wait"]:  # both writers start together: their transactions interleave
        print("ready", flush=True)
        sys.stdin.readline()
    for first in range(start, start + count, 50):
        cache.put_many(entries(50, first))
        print(first + 50, flush=True)  # every entry below this is committed
    print("problem", cache.problem, flush=True)
    """
)


def start_writer(folder: Path, start: int, count: int, *wait: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), str(start), str(count), str(Path(__file__).parent), *wait],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=REPO,
    )


@pytest.mark.slow
def test_two_processes_writing_one_cache_lose_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    ReplyCache.open(folder).close()  # the file exists before either writer opens it
    writers = [start_writer(folder, 0, 5000, "wait"), start_writer(folder, 5000, 5000, "wait")]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert out.splitlines()[-1] == "problem None", out[-500:]
    opened = ReplyCache.open(folder)
    found = opened.get_many([key_of(i) for i in range(10_000)])
    assert len(found) == 10_000
    assert all(found[key_of(i)] == reply_of(i) for i in range(10_000))
    assert opened.info().entries == 10_000 and opened.damaged == 0
    assert counted_by_info(opened) == counted_by_scan(opened.path)
    with raw(opened.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    opened.close()


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_leaves_a_whole_cache(tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    rng = random.Random(7)
    committed: set[int] = set()
    attempted = 0
    for round_ in range(6):
        start = round_ * 100_000
        writer = start_writer(folder, start, 100_000)
        assert writer.stdout is not None
        lines = rng.randint(1, 15)
        done = start
        for _ in range(lines):
            done = int(writer.stdout.readline())
        # a moment inside the next transactions: somewhere in the next few puts
        threading.Event().wait(rng.uniform(0, 0.02))
        writer.kill()
        writer.communicate(timeout=60)
        committed.update(range(start, done))
        attempted = max(attempted, start + 100_000)
        opened = ReplyCache.open(folder)
        assert opened.problem is None, opened.problem
        wanted = [i for r in range(round_ + 1) for i in range(r * 100_000, r * 100_000 + 2000)]
        found = opened.get_many([key_of(i) for i in wanted])
        assert opened.damaged == 0
        for i in wanted:
            # committed before the last line read: there; any other found: whole, and its own
            if i in committed or key_of(i) in found:
                assert found[key_of(i)] == reply_of(i)
        opened.close()
    with raw(folder / FILE_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- the writer ---------------------------------------------------------------------------------


class HeldCache(ReplyCache):
    """A real cache whose writes wait for the test to let them go, and that records them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[int] = []
        self.at_once = 0
        self.most_at_once = 0
        self.release = threading.Event()
        self.started = threading.Event()
        self.lock = threading.Lock()

    def put_rows(self, batch: Any, *, replace: bool = False) -> None:
        with self.lock:
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
            self.calls.append(len(batch))
        self.started.set()
        self.release.wait(10)
        super().put_rows(batch, replace=replace)
        with self.lock:
            self.at_once -= 1


def held_cache(tmp_path: Path) -> HeldCache:
    opened = HeldCache(tmp_path / FILE_NAME)
    opened._setup(opened._connection())
    return opened


async def test_the_writer_batches_writes_one_at_a_time_off_the_loop(tmp_path: Path) -> None:
    held = held_cache(tmp_path)
    writer = CacheWriter(held, replace=False, flush_s=60.0, flush_entries=10)
    for key, endpoint, model, reply in entries(10):
        writer.add(key, endpoint, model, reply)
    await asyncio.to_thread(held.started.wait, 10)  # the first ten went, at once (not after 60 s)
    assert held.calls == [10]
    for key, endpoint, model, reply in entries(15, 10):
        writer.add(key, endpoint, model, reply)  # the loop runs on while the write is held
    assert held.calls == [10]  # never two writes at once: these wait for the first
    held.release.set()
    await writer.close()
    assert held.calls == [10, 15]
    assert held.most_at_once == 1
    assert writer.written == 25
    assert len(held.get_many([key_of(i) for i in range(25)])) == 25
    held.close()


async def test_the_writer_puts_a_few_replies_after_its_interval(tmp_path: Path) -> None:
    held = held_cache(tmp_path)
    held.release.set()
    writer = CacheWriter(held, replace=False, flush_s=0.01, flush_entries=1000)
    for key, endpoint, model, reply in entries(3):
        writer.add(key, endpoint, model, reply)
    assert held.calls == []
    await asyncio.to_thread(held.started.wait, 10)  # without close(): the timer started it
    await writer.close()
    assert held.calls == [3]
    held.close()


async def test_the_writer_with_replace_overwrites(cache: ReplyCache) -> None:
    cache.put_many(entries(1))
    writer = CacheWriter(cache, replace=True)
    writer.add(key_of(0), "h", "gpt-4o-mini", dict(reply_of(0), content="fresh"))
    await writer.close()
    assert cache.get_many([key_of(0)])[key_of(0)]["content"] == "fresh"


async def test_the_writer_of_a_cache_with_a_problem_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    broken = ReplyCache.open(tmp_path / "file")
    writer = CacheWriter(broken, replace=False)
    writer.add(key_of(0), "h", None, reply_of(0))
    with pytest.raises(ValueError):
        writer.add("not a key", "h", None, reply_of(0))
    with pytest.raises(ValueError):
        writer.add(key_of(1), "h", None, dict(reply_of(0), extra={"not": "text"}))
    await writer.close()
    assert writer.written == 0


# -- info and prune ----------------------------------------------------------------------------


def age(path: Path, keys: list[str], seconds_ago: float) -> None:
    with raw(path) as conn:
        conn.executemany(
            "UPDATE replies SET created = ? WHERE key = ?",
            [(time.time() - seconds_ago, bytes.fromhex(key)) for key in keys],
        )


def test_info_counts_entries_and_bytes_by_model(cache: ReplyCache) -> None:
    cache.put_many(entries(30, 0, "gpt-4o") + entries(10, 30, "gpt-4o-mini"))
    cache.put_many([(key_of(99), "h", None, reply_of(99, "served-model"))])  # no requested model: the reply's
    info = cache.info()
    assert info.entries == 41
    assert [(m.model, m.entries) for m in info.by_model] == [("gpt-4o", 30), ("gpt-4o-mini", 10), ("served-model", 1)]
    assert info.data_bytes == sum(m.bytes for m in info.by_model) > 41 * 300
    assert info.bytes >= cache.path.stat().st_size > 0
    assert info.oldest is not None and info.newest is not None and info.oldest <= info.newest


def counted_by_scan(path: Path) -> dict[str | None, tuple[int, int]]:
    with raw(path) as conn:
        rows = conn.execute("SELECT model, count(*), sum(size) FROM replies GROUP BY model").fetchall()
    return {model: (entries, size) for model, entries, size in rows}


def counted_by_info(cache: ReplyCache) -> dict[str | None, tuple[int, int]]:
    return {m.model: (m.entries, m.bytes) for m in cache.info().by_model}


def test_info_counts_stay_true_through_ignored_puts_replaces_damage_and_prunes(cache: ReplyCache) -> None:
    """`info` reads counts kept as entries come and go; they are what a full scan finds, at every step."""
    cache.put_many(entries(30, 0, "a") + entries(20, 30, "b") + [(key_of(60), "h", None, reply_of(60, "served"))])
    assert counted_by_info(cache) == counted_by_scan(cache.path)
    cache.put_many(entries(10, 0, "a"))  # already there: ignored
    longer = [(key_of(i), "h", "b", dict(reply_of(i), content="a much longer answer " * 20)) for i in range(5)]
    cache.put_many(longer, replace=True)  # five entries move from a to b, with other sizes
    assert counted_by_info(cache) == counted_by_scan(cache.path)
    assert counted_by_info(cache)["a"][0] == 25 and counted_by_info(cache)["b"][0] == 25
    with raw(cache.path) as conn:
        conn.execute("UPDATE replies SET checksum = checksum + 1 WHERE key = ?", (bytes.fromhex(key_of(40)),))
    cache.get_many([key_of(40)])  # damaged: deleted
    assert cache.damaged == 1
    assert counted_by_info(cache) == counted_by_scan(cache.path)
    cache.put_many(entries(1, 40, "b"))
    cache.prune(model="served")
    cache.prune(max_bytes=cache.info().data_bytes // 2)
    assert counted_by_info(cache) == counted_by_scan(cache.path)
    assert cache.info().entries == sum(n for n, _ in counted_by_scan(cache.path).values())


def test_prune_by_age_by_model_and_both(cache: ReplyCache) -> None:
    cache.put_many(entries(20, 0, "a") + entries(20, 20, "b"))
    age(cache.path, [key_of(i) for i in (*range(0, 5), *range(20, 30))], 40 * 86400)
    assert cache.prune(older_than_s=30 * 86400, model="a") == 5
    assert cache.prune(older_than_s=30 * 86400) == 10
    assert cache.prune(model="b") == 10
    assert cache.info().entries == 15
    assert set(cache.get_many([key_of(i) for i in range(40)])) == {key_of(i) for i in range(5, 20)}
    with pytest.raises(ValueError):
        cache.prune()


def test_prune_to_a_size_removes_the_oldest_first_and_the_file_shrinks(tmp_path: Path) -> None:
    opened = ReplyCache.open(tmp_path)
    big = [(key_of(i), "h", "m", dict(reply_of(i), content="x" * 2000)) for i in range(3000)]
    for start in range(0, 3000, 500):
        opened.put_many(big[start : start + 500])
    before = opened.info()
    removed = opened.prune(max_bytes=before.data_bytes // 4)
    after = opened.info()
    assert 2000 <= removed < 3000
    assert after.data_bytes <= before.data_bytes // 4
    survivors = opened.get_many([key_of(i) for i in range(3000)])
    assert set(survivors) == {key_of(i) for i in range(removed, 3000)}  # the newest stay
    assert after.bytes < before.bytes / 2, (before.bytes, after.bytes)
    assert opened.prune(max_bytes=10**12) == 0
    opened.close()


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400)]
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 1536 * 1024**2), ("100000", 100000)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["30", "d", "-1d", "30 days", "1y", ""])
def test_a_bad_age_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--older-than"):
        parse_age(text)


@pytest.mark.parametrize("text", ["2XB", "GB", "-5MB", "1e999", "lots"])
def test_a_bad_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--max-size"):
        parse_size(text)


# -- the command ------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env)


def test_cache_command_shows_the_folder_entries_size_and_models(tmp_path: Path) -> None:
    opened = ReplyCache.open(tmp_path)
    opened.put_many(entries(3, 0, "gpt-4o") + entries(2, 3, "gpt-4o-mini"))
    opened.close()
    result = invoke("cache", "--cache", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"reply cache: {tmp_path / FILE_NAME}"
    assert lines[1].startswith("entries: 5  size on disk: ") and "oldest: 20" in lines[1]
    assert lines[3].split() == ["MODEL", "ENTRIES", "BYTES"]
    assert lines[4].split()[:2] == ["gpt-4o", "3"] and lines[5].split()[:2] == ["gpt-4o-mini", "2"]
    figures = json.loads(invoke("cache", "--cache", str(tmp_path), "--json").output)
    assert figures["entries"] == 5 and figures["by_model"][0] == {
        "model": "gpt-4o",
        "entries": 3,
        "bytes": figures["by_model"][0]["bytes"],
    }


def test_cache_command_default_folder_and_off(tmp_path: Path) -> None:
    result = invoke("cache", env={"BATCHHUB_CACHE": str(tmp_path / "nothing-yet")})
    assert result.exit_code == 0
    assert result.output.strip() == f"no reply cache yet in {tmp_path / 'nothing-yet'}"
    assert not (tmp_path / "nothing-yet").exists()  # looking creates nothing
    result = invoke("cache", env={"BATCHHUB_CACHE": "off"})
    assert result.exit_code == 2
    assert "the cache is off" in result.output and "--cache DIR" in result.output


def test_cache_command_on_a_damaged_file_says_so(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"\0" * 100 + os.urandom(5000))
    result = invoke("cache", "--cache", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.startswith("error: reply cache ") and "delete" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_prune_command_prints_what_it_removed(tmp_path: Path) -> None:
    opened = ReplyCache.open(tmp_path)
    opened.put_many(entries(4, 0, "a") + entries(6, 4, "b"))
    opened.close()
    result = invoke("cache", "prune", "--cache", str(tmp_path), "--model", "a")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed 4 of 10 replies; 6 left, ")
    result = invoke("cache", "--cache", str(tmp_path), "prune", "--older-than", "1d", "--json")
    assert json.loads(result.output)["removed"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "needs --older-than, --model or --max-size"),
        (("--older-than", "soon"), "--older-than: expected a number and a unit"),
        (("--max-size", "big"), "--max-size: expected a size"),
    ],
)
def test_prune_command_refuses_bad_values(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = invoke("cache", "prune", "--cache", str(tmp_path), *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / FILE_NAME).exists()


def test_the_readme_cache_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_readme_examples import examples, run_line

    monkeypatch.setenv("BATCHHUB_CACHE", str(tmp_path / "cache"))
    opened = ReplyCache.open(tmp_path / "cache")
    opened.put_many(entries(10, 0, "gpt-4o-mini") + entries(5, 10, "gpt-4o"))
    age(opened.path, [key_of(i) for i in range(4)], 31 * 86400)
    for line in examples()["cache"]:
        run_line(line, tmp_path)
    assert {m.model: m.entries for m in opened.info().by_model} == {"gpt-4o-mini": 6}
    opened.close()


_CLOSE_WHILE_LOOKING = """
import sys, threading, time
from pathlib import Path
from batchhub.reply_cache import ReplyCache
folder = Path(sys.argv[1])
cache = ReplyCache.open(folder)
reply = {"content": "x" * 200, "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
cache.put_many([(f"{i:032x}", "e", "m", reply) for i in range(20000)])
cache.close()
for attempt in range(30):
    cache = ReplyCache.open(folder)
    looking = threading.Thread(target=cache.get_many, args=([f"{i:032x}" for i in range(20000)],))
    looking.start()
    time.sleep(0.002 * (attempt % 10))
    cache.close()  # as a run that stops closes it while a lookup runs in a thread
    looking.join()
print("ok")
"""


def test_closing_the_cache_while_a_lookup_runs_in_a_thread_waits_for_it(tmp_path: Path) -> None:
    """A run stopped (Ctrl-C) while the reader looked rows up in a thread closed the cache under the lookup:
    the process died of a segmentation fault."""
    import subprocess
    import sys

    from jobprocs import child_env

    proc = subprocess.run(
        [sys.executable, "-c", _CLOSE_WHILE_LOOKING, str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
