"""The reply cache at scale: its index's size, opening it cold, lookups and puts per second.

    python benchmarks/cache_index.py                  # 10,000,000 entries (~8 GB on disk, several minutes)
    python benchmarks/cache_index.py --entries 1000000
    python benchmarks/cache_index.py --smoke          # 5,000 entries, for the tests

It builds a cache (`batchhub.reply_cache`, the real schema and entries: `encode_entry`,
`checksum`) of N small replies as a chat job stores them: a sentence or a paragraph of
content, the `extra` JSON of a plain OpenAI reply (created, system_fingerprint, usage
details), usage counts. The build is a bulk path (one transaction per 100,000 rows, the key
index created after the rows, synchronous off); a job's own writes go through `CacheWriter`,
which is measured apart. Then, each in a fresh child process so that nothing is warm in it:

- index bytes: the `replies_key` index's pages, from SQLite's `dbstat` table;
- open + the first 1,000 random lookups, cold: the file's pages are first dropped from the
  OS page cache (posix_fadvise DONTNEED on this file only), so they are read from disk;
- lookups per second in 1,000-key batches, hits (random keys put) and misses (keys never put);
- puts per second through `CacheWriter` (100,000 new replies; 5,000 in smoke), and the time
  `add()` takes on the event loop;
- `info()` (what `batchhub cache` shows), then `prune(max_bytes=...)` of the oldest 1%.

The file is deleted at the end unless `--workdir` names a folder to keep it in.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from batchhub.cache_writer import CacheWriter
from batchhub.reply_cache import FILE_NAME, KEY_INDEX_SQL, ReplyCache, checksum, encode_entry

WORDS = (
    "the",
    "a",
    "sea",
    "wave",
    "light",
    "harbour",
    "boat",
    "morning",
    "quiet",
    "salt",
    "wind",
    "over",
    "under",
    "tide",
    "shore",
    "gull",
    "deep",
    "blue",
    "grey",
    "calm",
    "storm",
    "sails",
    "far",
    "near",
    "slowly",
    "always",
    "never",
    "bright",
    "cold",
    "warm",
    "return",
)
BATCH = 1000
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")


def key_of(i: int) -> str:
    """The request hash of entry i: 32 hex characters of a sha256, as the job's are."""
    return hashlib.sha256(b"request %d" % i).hexdigest()[:32]


def reply_of(i: int, rng: random.Random) -> dict[str, Any]:
    words = rng.randint(5, 60)  # a label's sentence to a short paragraph
    content = " ".join(rng.choice(WORDS) for _ in range(words))
    prompt = rng.randint(20, 400)
    completion = words + words // 3
    created = 1_760_000_000 + i
    extra = {
        "created": created,
        "system_fingerprint": f"fp_{i % 4096:010x}",
        "service_tier": "default",
        "usage": {
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    }
    return {
        "content": content,
        "finish_reason": "stop",
        "extra": json.dumps(extra, separators=(",", ":")),
        "model": MODELS[i % 3] + "-2024-07-18",
        "response_id": f"chatcmpl-{i:029x}",
        "request_id": f"req_{i:032x}",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": 0,
        "latency_s": round(rng.uniform(0.2, 3.0), 3),
        "http_status": 200,
        "finished_at": created + 0.5,
    }


def build(folder: Path, entries: int) -> float:
    """A cache of `entries` replies, the bulk way; seconds it took."""
    started = time.perf_counter()
    cache = ReplyCache.open(folder)
    assert cache.problem is None, cache.problem
    cache.close()
    rng = random.Random(1)
    conn = sqlite3.connect(folder / FILE_NAME, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    conn.execute("DROP INDEX replies_key")
    now = time.time()
    chunk = 100_000
    for first in range(0, entries, chunk):
        rows = []
        for i in range(first, min(entries, first + chunk)):
            key = key_of(i)
            raw = bytes.fromhex(key)
            data = encode_entry(key, reply_of(i, rng))
            model = MODELS[i % 3]
            rows.append(
                (raw, now - (entries - i) * 0.01, "api.openai.com", model, len(data) + 100, checksum(raw, data), data)
            )
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO replies (key, created, endpoint, model, size, checksum, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        if first // chunk % 10 == 9:
            c.log(f"  {first + chunk:,} entries, {time.perf_counter() - started:.0f} s")
    c.log("  building the key index")
    conn.execute(KEY_INDEX_SQL)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


# -- the measurements, each in a child process ------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    for suffix in ("", "-wal"):
        name = path.with_name(path.name + suffix)
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure_cold(folder: Path, entries: int) -> dict[str, Any]:
    rng = random.Random(2)
    keys = [key_of(rng.randrange(entries)) for _ in range(1000)]
    drop_from_page_cache(folder / FILE_NAME)
    started = time.perf_counter()
    cache = ReplyCache.open(folder)
    opened = time.perf_counter() - started
    found = cache.get_many(keys)
    total = time.perf_counter() - started
    assert cache.problem is None and cache.damaged == 0, (cache.problem, cache.damaged)
    assert len(found) == len(set(keys)), len(found)
    cache.close()
    return {"open_s": opened, "open_lookups_s": total}


def measure_lookups(folder: Path, entries: int, batches: int) -> dict[str, Any]:
    """Keys per second in 1,000-key batches: random hits (anywhere in the cache: read from disk, as
    in a cache larger than memory), hits in put order (a job run again: its replies were put
    together, so they share pages), each a second time with the same keys (warm: pages in the OS
    cache), and misses (the key index only)."""
    rng = random.Random(3)
    cache = ReplyCache.open(folder)
    results: dict[str, Any] = {}

    def keys_for(kind: str) -> list[str]:
        if kind == "random hits":
            return [key_of(rng.randrange(entries)) for _ in range(BATCH)]
        if kind == "hits in put order":
            first = rng.randrange(max(1, entries - BATCH))
            return [key_of(i) for i in range(first, min(entries, first + BATCH))]
        return [key_of(entries + 1_000_000_000 + rng.randrange(10**9)) for _ in range(BATCH)]

    def rate(key_batches: list[list[str]], hits: bool) -> float:
        elapsed = 0.0
        for keys in key_batches:
            started = time.perf_counter()
            found = cache.get_many(keys)
            elapsed += time.perf_counter() - started
            assert len(found) == (len(set(keys)) if hits else 0)
        return sum(len(keys) for keys in key_batches) / elapsed

    for kind in ("random hits", "hits in put order", "misses"):
        key_batches = [keys_for(kind) for _ in range(batches)]
        results[kind] = rate(key_batches, kind != "misses")
        if kind != "misses":
            results[f"{kind}, warm"] = rate(key_batches, True)
    assert cache.problem is None and cache.damaged == 0
    cache.close()
    return results


def measure_puts(folder: Path, entries: int, puts: int) -> dict[str, Any]:
    rng = random.Random(4)
    new = [(key_of(entries + i), "api.openai.com", "gpt-4o-mini", reply_of(entries + i, rng)) for i in range(puts)]
    cache = ReplyCache.open(folder)

    async def put_all() -> tuple[float, float]:
        writer = CacheWriter(cache, replace=False)
        on_loop = 0.0
        started = time.perf_counter()
        for n, (key, endpoint, model, reply) in enumerate(new):
            t0 = time.perf_counter()
            writer.add(key, endpoint, model, reply)
            on_loop += time.perf_counter() - t0
            if n % 100 == 99:
                await asyncio.sleep(0)  # a job's loop passes between replies
        await writer.close()
        return time.perf_counter() - started, on_loop

    wall, on_loop = asyncio.run(put_all())
    assert cache.problem is None
    assert len(cache.get_many([key for key, *_ in new[:1000]])) == min(1000, puts)
    started = time.perf_counter()
    info = cache.info()
    info_s = time.perf_counter() - started
    path = folder / FILE_NAME
    with sqlite3.connect(path) as conn:  # the puts' WAL into the file first: the shrink is the prune's alone
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    started = time.perf_counter()
    pruned = cache.prune(max_bytes=info.data_bytes * 99 // 100)
    prune_s = time.perf_counter() - started
    shrunk = size - path.stat().st_size
    assert cache.problem is None
    cache.close()
    return {
        "puts_per_s": puts / wall,
        "add_us": on_loop / puts * 1e6,
        "info_s": info_s,
        "entries": info.entries,
        "pruned": pruned,
        "prune_s": prune_s,
        "shrunk_bytes": shrunk,
    }


def measure_sizes(folder: Path) -> dict[str, Any]:
    path = folder / FILE_NAME
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    # pages counted one by one: dbstat's aggregate pgsize wraps at 4 GiB in SQLite 3.40
    pages = conn.execute("SELECT count(*) FROM dbstat WHERE name = 'replies_key'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return {"index_bytes": pages * page_size, "file_bytes": path.stat().st_size}


def child(what: str, folder: Path, entries: int, amount: int) -> None:
    figures = {
        "cold": lambda: measure_cold(folder, entries),
        "lookups": lambda: measure_lookups(folder, entries, amount),
        "puts": lambda: measure_puts(folder, entries, amount),
        "sizes": lambda: measure_sizes(folder),
    }[what]()
    print(json.dumps(figures))


def in_child(what: str, folder: Path, entries: int, amount: int = 0) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            what,
            "--workdir",
            str(folder),
            "--entries",
            str(entries),
            "--amount",
            str(amount),
        ],
        capture_output=True,
        text=True,
        env=c.child_env(),
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{what} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    c.log(f"  {what}: {figures}")  # as measured: a run stopped later still shows it
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, help="entries in the cache (default 10,000,000; smoke 5,000)")
    parser.add_argument("--smoke", action="store_true", help="a few thousand entries, to check the script runs")
    parser.add_argument("--workdir", help="folder for the cache (kept); default a temporary one, removed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--amount", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    entries = args.entries or (5_000 if args.smoke else 10_000_000)
    if args.child:
        child(args.child, Path(args.workdir), entries, args.amount)
        return

    print(c.machine_line(), flush=True)
    with c.workdir("batchhub-cache-index-", keep=args.workdir) as folder:
        if (folder / FILE_NAME).exists():
            raise SystemExit(f"{folder / FILE_NAME} exists: name an empty --workdir")
        c.log(f"building a cache of {entries:,} entries in {folder}")
        build_s = build(folder, entries)
        sizes = in_child("sizes", folder, entries)
        cold = [in_child("cold", folder, entries) for _ in range(3)]
        lookups = in_child("lookups", folder, entries, 5 if args.smoke else 50)
        puts = in_child("puts", folder, entries, 5_000 if args.smoke else 100_000)
        (folder / FILE_NAME).unlink()
        for suffix in ("-wal", "-shm"):
            (folder / (FILE_NAME + suffix)).unlink(missing_ok=True)

    open_s = c.median([run["open_lookups_s"] for run in cold])
    lines = [
        f"index: {sizes['index_bytes'] / 1e6:,.0f} MB ({sizes['index_bytes'] / entries:.1f} bytes an entry); "
        f"target well under 1 GB at 10M: {'met' if sizes['index_bytes'] / entries * 10_000_000 < 0.5e9 else 'NOT met'}",
        f"file: {sizes['file_bytes'] / 1e6:,.0f} MB ({sizes['file_bytes'] / entries:,.0f} bytes an entry)",
        f"open + first 1,000 random lookups, cold: {open_s:.3f} s (median of 3; open alone "
        f"{c.median([run['open_s'] for run in cold]) * 1000:.1f} ms); target about a second: "
        f"{'met' if open_s <= 1.5 else 'NOT met'}",
        "lookups in 1,000-key batches: "
        + ", ".join(f"{kind} {rate:,.0f}/s ({BATCH / rate * 1e3:.1f} ms a batch)" for kind, rate in lookups.items()),
        f"puts through CacheWriter: {puts['puts_per_s']:,.0f}/s; add() on the event loop {puts['add_us']:.2f} us",
        f"info (batchhub cache) of {puts['entries']:,} entries: {puts['info_s'] * 1e3:.1f} ms",
        f"prune --max-size to 99%: {puts['pruned']:,} oldest entries removed in {puts['prune_s']:.2f} s, "
        f"the file {puts['shrunk_bytes'] / 1e6:,.1f} MB smaller",
        f"build (bulk path): {build_s:.0f} s",
    ]
    print()
    print(f"Reply cache ({entries:,} entries):")
    for line in lines:
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
