"""Tests for batchhub.io: input detection and streaming readers, fingerprints, atomic exports."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchhub.errors import InputError, UsageError
from batchhub.io import InputSource, detect_format, fingerprint, open_input
from batchhub.output import OutputWriter, output_format_for
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec

# Larger than the CSV reader's 16 MiB block: 100k rows of about 200 bytes.
BIG_ROWS = 100_000
PAD = "p" * 190


def input_error(call, path: Path, *fragments: str) -> str:
    """Run `call`, expect an InputError with a one-line message naming `path`; return the message."""
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def all_rows(source: InputSource, columns, batch_size: int = 2048) -> list[dict]:
    return [row for batch in source.iter_rows(columns, batch_size) for row in batch]


def all_batches(source: InputSource, batch_size: int = 65536) -> pa.Table:
    batches = list(source.iter_batches(batch_size))
    assert len({batch.schema for batch in batches}) == 1
    return pa.Table.from_batches(batches)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


# --- detect_format -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.csv", "csv"),
        ("a.CSV", "csv"),
        ("a.tsv", "csv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.json", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
    ],
)
def test_detect_format_by_extension(tmp_path: Path, name: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text("x\n1\n" if expected == "csv" else '{"x": 1}\n')
    assert detect_format(path) == expected


def test_detect_format_parquet_by_magic_whatever_the_name(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["hi", "yo"]})
    for name in ("real.parquet", "lies.csv", "lies.jsonl", "noext"):
        pq.write_table(table, tmp_path / name)
        assert detect_format(tmp_path / name) == "parquet"
    source = open_input(tmp_path / "lies.csv")
    assert source.format == "parquet"
    assert all_rows(source, ["prompt"]) == [{"prompt": "hi"}, {"prompt": "yo"}]


def test_parquet_extension_without_magic(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_text("prompt\nhello\n")
    input_error(lambda: detect_format(path), path, "not a Parquet file (no PAR1 magic); is the extension wrong?")
    input_error(lambda: open_input(path), path, "no PAR1 magic")


def test_truncated_parquet(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"a": list(range(100))}), path)
    path.write_bytes(path.read_bytes()[:-10])
    input_error(lambda: open_input(path), path, "truncated or damaged")


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("prompt\nhi\n")
    input_error(lambda: open_input(path), path, ".txt", ".csv", ".jsonl", ".parquet")


def test_json_lines_named_csv_is_read_as_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lies.csv", [{"prompt": "a, b", "n": 1}])
    source = open_input(path)
    assert source.format == "jsonl"
    assert all_rows(source, ["prompt", "n"]) == [{"prompt": "a, b", "n": 1}]


def test_gz_name_with_plain_content_is_read_plain(tmp_path: Path) -> None:
    path = tmp_path / "already-unzipped.csv.gz"
    path.write_text("prompt\nhi\n")
    source = open_input(path)
    assert source.compression is None
    assert all_rows(source, ["prompt"]) == [{"prompt": "hi"}]


# --- CSV -----------------------------------------------------------------------------


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "prompt": ["Say hi", 'He said "yes",\nthen left', "naïve café ☕"],
            "note": ["x", None, "z"],
        }
    )
    frame.to_csv(path, index=False)
    source = open_input(path)
    assert (source.format, source.columns, source.delimiter) == ("csv", ("id", "prompt", "note"), ",")
    assert source.count_rows() == 3
    assert all_rows(source, ["prompt", "id", "note"]) == [
        {"prompt": "Say hi", "id": "1", "note": "x"},
        {"prompt": 'He said "yes",\nthen left', "id": "2", "note": ""},
        {"prompt": "naïve café ☕", "id": "3", "note": "z"},
    ]
    table = all_batches(source)
    assert table.schema.field("id").type == pa.int64()
    assert table.column("prompt").to_pylist() == frame["prompt"].tolist()


def test_csv_batches_are_exact_and_ordered(tmp_path: Path) -> None:
    path = tmp_path / "ten_k.csv"
    path.write_text("n,prompt\n" + "".join(f"{i},prompt {i}\n" for i in range(10_000)))
    source = open_input(path)
    batches = list(source.iter_rows(["n"], batch_size=1000))
    assert [len(batch) for batch in batches] == [1000] * 10
    assert [row["n"] for batch in batches for row in batch] == [str(i) for i in range(10_000)]
    arrow = list(source.iter_batches(batch_size=3000))
    assert [batch.num_rows for batch in arrow] == [3000, 3000, 3000, 1000]
    assert source.count_rows() == 10_000


def test_csv_rows_without_columns_still_count(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b\n1,2\n3,4\n5,6\n")
    assert list(open_input(path).iter_rows([], batch_size=2)) == [[{}, {}], [{}]]


def test_csv_typed_inference_falls_back_to_text(tmp_path: Path) -> None:
    path = tmp_path / "late_text.csv"
    # Quoted line breaks in every row: blocks must still split between rows.
    body = "".join(f'{i},"{PAD}\n{i}"\n' for i in range(BIG_ROWS))
    path.write_text("n,pad\n" + body + "not a number,tail\n")
    assert path.stat().st_size > 16 * 1024 * 1024  # more than one reader block
    source = open_input(path)
    table = all_batches(source)
    assert table.schema == pa.schema([("n", pa.string()), ("pad", pa.string())])
    assert table.num_rows == BIG_ROWS + 1
    assert table.column("n")[0].as_py() == "0"
    assert table.column("n")[-1].as_py() == "not a number"
    assert table.column("pad")[BIG_ROWS - 1].as_py() == f"{PAD}\n{BIG_ROWS - 1}"
    assert source.count_rows() == BIG_ROWS + 1
    assert sum(len(batch) for batch in source.iter_rows(["pad"], batch_size=10_000)) == BIG_ROWS + 1


def test_csv_typed_inference_kept_when_the_file_fits(tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    # The `late` column is empty in the first block: read as text, not as Arrow's null type.
    path.write_text("n,pad,late\n" + "".join(f"{i},{PAD},\n" for i in range(BIG_ROWS)) + "7,x,seven\n")
    assert path.stat().st_size > 16 * 1024 * 1024
    table = all_batches(open_input(path))
    assert table.schema == pa.schema([("n", pa.int64()), ("pad", pa.string()), ("late", pa.string())])
    assert table.column("n").to_pylist()[-2:] == [BIG_ROWS - 1, 7]
    assert table.column("late").to_pylist()[-2:] == ["", "seven"]


def test_header_only_csv_has_columns_and_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "head.csv"
    path.write_text("id,prompt\n")
    source = open_input(path)
    assert source.columns == ("id", "prompt")
    assert source.count_rows() == 0
    assert list(source.iter_rows(["prompt"])) == []
    batches = list(source.iter_batches())
    assert [b.num_rows for b in batches] == [0]
    assert batches[0].schema.names == ["id", "prompt"]


def test_tsv(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_text("id\tprompt\n1\tHello, world\n2\tBye, now\n")
    source = open_input(path)
    assert source.delimiter == "\t"
    assert source.columns == ("id", "prompt")
    assert all_rows(source, ["prompt"]) == [{"prompt": "Hello, world"}, {"prompt": "Bye, now"}]


def test_gzipped_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "in.csv.gz"
    with gzip.open(csv_path, "wt") as file:
        file.write("id,prompt\n" + "".join(f"{i},p{i}\n" for i in range(500)))
    jsonl_path = tmp_path / "in.jsonl.gz"
    with gzip.open(jsonl_path, "wt") as file:
        file.write("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n\n" for i in range(500)))
    for path in (csv_path, jsonl_path):
        source = open_input(path)
        assert source.compression == "gzip"
        assert source.count_rows() == 500
        rows = all_rows(source, ["prompt"], batch_size=64)
        assert [row["prompt"] for row in rows] == [f"p{i}" for i in range(500)]
        assert all_batches(source).num_rows == 500


def test_csv_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt\nhi\n")
    assert open_input(path).columns == ("prompt",)


# --- Parquet ---------------------------------------------------------------------------


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    when = dt.datetime(2024, 5, 1, 12, 30)
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "prompt": ["a", None, "c"],
            "tags": [["x", "y"], [], None],
            "meta": [{"lang": "en"}, {"lang": "fr"}, None],
            "at": [when, None, when],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    source = open_input(path)
    assert source.columns == ("id", "prompt", "tags", "meta", "at")
    assert source.count_rows() == 3
    assert all_rows(source, ["tags", "meta", "at", "prompt"], batch_size=2) == [
        {"tags": ["x", "y"], "meta": {"lang": "en"}, "at": when, "prompt": "a"},
        {"tags": [], "meta": {"lang": "fr"}, "at": None, "prompt": None},
        {"tags": None, "meta": None, "at": when, "prompt": "c"},
    ]
    assert all_batches(source).equals(table)


def test_parquet_batches_cross_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"n": list(range(10_000))}), path, row_group_size=3000)
    source = open_input(path)
    batches = list(source.iter_rows(["n"], batch_size=1000))
    assert [len(batch) for batch in batches] == [1000] * 10
    assert [row["n"] for batch in batches for row in batch] == list(range(10_000))
    assert [len(batch) for batch in source.iter_rows([], batch_size=4096)] == [4096, 4096, 1808]


# --- JSON Lines ------------------------------------------------------------------------


def test_heterogeneous_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"id": 1, "prompt": "a", "score": 1, "meta": {"lang": "en"}, "label": 1},
            "",
            {"id": 2, "score": 2.5, "meta": {"src": "web"}, "label": "spam"},
            "   ",
            {"id": 3, "prompt": "c", "label": [1, 2], "tags": ["x"]},
        ],
    )
    source = open_input(path)
    assert source.columns == ("id", "prompt", "score", "meta", "label", "tags")
    assert source.count_rows() == 3
    assert all_rows(source, ["prompt", "label"]) == [
        {"prompt": "a", "label": 1},
        {"prompt": None, "label": "spam"},
        {"prompt": "c", "label": [1, 2]},
    ]
    for batch_size in (1, 65536):  # types unified within one batch and across batches
        table = all_batches(source, batch_size)
        assert table.schema.field("id").type == pa.int64()
        assert table.schema.field("score").type == pa.float64()
        assert table.schema.field("meta").type == pa.struct([("lang", pa.string()), ("src", pa.string())])
        assert table.schema.field("label").type == pa.string()
        assert table.column("score").to_pylist() == [1.0, 2.5, None]
        assert table.column("label").to_pylist() == ["1", "spam", "[1, 2]"]
        assert table.column("meta").to_pylist()[1] == {"lang": None, "src": "web"}


def test_jsonl_columns_include_keys_first_seen_after_the_first_1000_rows(tmp_path: Path) -> None:
    rows: list = [{"prompt": f"p{i}"} for i in range(1000)] + [{"prompt": "last", "extra": True}]
    rows += ['{"prompt": "p", "late": "\\ud800 lone surrogate"}', "", {"prompt": "p", "later": {"x": 1}}]
    source = open_input(write_jsonl(tmp_path / "late_key.jsonl", rows))
    assert source.columns == ("prompt", "extra", "late", "later")
    table = all_batches(source)
    assert table.schema.names == ["prompt", "extra", "late", "later"]
    assert table.column("extra").to_pylist()[-4:] == [None, True, None, None]
    assert all_rows(source, ["later"])[-1] == {"later": {"x": 1}}
    # a template over a late key is a job like any other, not "not in the data"
    builder = RequestBuilder(JobSpec(input=source.path, model="m", template="{prompt} {extra}"), source.columns)
    assert builder.needed_columns == ["prompt", "extra"]


def test_jsonl_columns_of_a_gzipped_file_with_a_late_key(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}"} for i in range(1200)] + [{"prompt": "x", "tail": 1}]
    path = tmp_path / "late.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert open_input(path).columns == ("prompt", "tail")


def test_jsonl_bad_line_after_the_sample_surfaces_while_reading(tmp_path: Path) -> None:
    rows: list = [{"prompt": f"p{i}"} for i in range(1499)] + ["[1, 2]"]
    path = write_jsonl(tmp_path / "late_bad.jsonl", rows)
    source = open_input(path)  # only the first 1000 rows are read here
    input_error(lambda: all_rows(source, ["prompt"]), path, "line 1500", "not a JSON object")
    input_error(lambda: all_batches(source), path, "line 1500")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b'{"a": 1}\n[1]\n', ("line 2 is an array, not a JSON object",)),
        (b'{"a": 1}\n{"a": \n', ("line 2 is not valid JSON",)),
        (b'{"a": 1}\n"text"\n', ("line 2 is a string",)),
        (b'{\n  "a": 1\n}\n', ("line 1 is not valid JSON", "each object on one line")),
        (b'[{"a": 1}, {"a": 2}]\n', ("holds a JSON array, not JSON Lines",)),
        (b'[\n  {"a": 1}\n]\n', ("holds a JSON array, not JSON Lines",)),
        (b'{"a": 1}\n{"a": "\xff"}\n', ("line 2 is not valid UTF-8",)),
        (b"\n\n  \n", ("no rows",)),
    ],
)
def test_bad_jsonl(tmp_path: Path, content: bytes, fragments: tuple[str, ...]) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    input_error(lambda: open_input(path), path, *fragments)


# --- input errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    input_error(lambda: open_input(path), path, "does not exist")
    input_error(lambda: fingerprint(path), path, "does not exist")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.csv"
    path.mkdir()
    input_error(lambda: open_input(path), path, "is a directory")


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.touch()
    input_error(lambda: open_input(path), path, "is empty")


def test_empty_once_decompressed(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv.gz"
    with gzip.open(path, "wb"):
        pass
    input_error(lambda: open_input(path), path, "is empty")


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    input_error(lambda: open_input(path), path, "could not read")


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 32 + b"PAR1")
    input_error(lambda: open_input(path), path, "could not read", "as Parquet")


def test_unreadable_csv_content(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n1,2,3\n")
    input_error(lambda: open_input(path), path, "could not read", "as CSV: ", "Expected 2 columns")


def test_csv_damage_after_the_first_block_surfaces_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "late_ragged.csv"
    path.write_text("n,pad\n" + "".join(f"{i},{PAD}\n" for i in range(BIG_ROWS)) + "1,2,3\n")
    source = open_input(path)  # reads the first block only
    message = input_error(lambda: all_rows(source, ["n"], batch_size=50_000), path, "as CSV after row ")
    assert int(message.split("after row ")[1].split(":")[0]) < BIG_ROWS
    input_error(lambda: all_batches(source), path, "as CSV after row")


@pytest.mark.parametrize(
    ("name", "content"),
    [("dup.csv", "a,b,a,b\n1,2,3,4\n"), ("dup.tsv", "a\tb\ta\tb\n1\t2\t3\t4\n")],
)
def test_duplicate_csv_columns(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    input_error(lambda: open_input(path), path, "has duplicate column names: a, b")


def test_duplicate_parquet_columns(tmp_path: Path) -> None:
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table([pa.array([1]), pa.array([2])], names=["x", "x"]), path)
    input_error(lambda: open_input(path), path, "has duplicate column names: x")


@pytest.mark.parametrize("content", ["\n\n\n", "  \n \n", ",,\n1,2,3\n"])
def test_csv_without_header(tmp_path: Path, content: str) -> None:
    path = tmp_path / "noheader.csv"
    path.write_text(content)
    input_error(lambda: open_input(path), path, "has no header row")


def test_csv_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\ncafé\n".encode("latin-1"))
    input_error(lambda: open_input(path), path, "not valid UTF-8")
    header = tmp_path / "latin1_header.csv"
    header.write_bytes("café\n1\n".encode("latin-1"))
    input_error(lambda: open_input(header), header, "not valid UTF-8 (in its header row)")


def test_utf16_text(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("prompt\nhi\n", encoding="utf-16")
    input_error(lambda: open_input(path), path, "UTF-16")


def test_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,prompt\n1,hi\n")
    input_error(lambda: open_input(path).iter_rows(["promt"]), path, "has no column promt", "id, prompt")


# --- fingerprint -------------------------------------------------------------------------


def test_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one 1 MiB chunk
    path.write_bytes(data)
    assert fingerprint(path) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fingerprint(str(path)) == fingerprint(path)
    path.write_bytes(data + b"x")
    assert fingerprint(path) == "sha256:" + hashlib.sha256(data + b"x").hexdigest()


# --- output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("out.parquet", "parquet"),
        ("out.csv", "csv"),
        ("out.TSV", "csv"),
        ("out.csv.gz", "csv"),
        ("out.jsonl", "jsonl"),
        ("out.ndjson.gz", "jsonl"),
    ],
)
def test_output_format_for(name: str, expected: str) -> None:
    assert output_format_for(name) == expected


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("out.txt", "unknown output format"), ("out.json", ".jsonl"), ("out.parquet.gz", ".parquet"), ("out", "no ext")],
)
def test_output_format_for_refuses(name: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as info:
        output_format_for(name)
    assert name in str(info.value)


def sample_batch() -> pa.RecordBatch:
    return pa.record_batch(
        {
            "row_id": pa.array([0, 1, 2], pa.int64()),
            "content": ["héllo ☕", None, 'quote " and\nnewline'],
            "score": [1.5, float("nan"), None],
        }
    )


def test_parquet_export_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    batch = sample_batch()
    with OutputWriter(path) as writer:
        for _ in range(50):  # many small batches make one row group
            writer.write_batch(batch)
    assert writer.rows_written == 150
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 1
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    table = parquet.read()
    assert table.schema == batch.schema
    assert table.column("content").to_pylist() == batch.column(1).to_pylist() * 50
    # Parquet keeps NaN apart from null; only the text formats fold it into null.
    assert str(table.column("score").to_pylist()[:3]) == "[1.5, nan, None]"


def test_csv_export(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    batch = pa.record_batch(
        {
            "row_id": [0, 1],
            "tags": pa.array([["a", "é"], None], pa.list_(pa.string())),
            "meta": [{"k": 1}, {"k": None}],
            "raw": pa.array([b"\x00\xff", None], pa.binary()),
            "score": [float("nan"), 2.0],
            "content": ["x, y", "line\nbreak"],
            "at": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), None], pa.timestamp("s", tz="UTC")),
        }
    )
    with OutputWriter(path) as writer:
        writer.write_batch(batch)
    frame = pd.read_csv(path, keep_default_na=False)
    assert frame["tags"].tolist() == ['["a","é"]', ""]
    assert frame["meta"].tolist() == ['{"k":1}', '{"k":null}']
    assert frame["raw"].tolist() == [base64.b64encode(b"\x00\xff").decode(), ""]
    assert frame["score"].tolist() == ["", "2"]
    assert frame["content"].tolist() == ["x, y", "line\nbreak"]
    assert frame["at"].tolist() == ["2024-01-02T03:04:05Z", ""]


def test_tsv_gz_export_reads_back_as_input(tmp_path: Path) -> None:
    path = tmp_path / "out.tsv.gz"
    with OutputWriter(path) as writer:
        writer.write_batch(sample_batch())
    source = open_input(path)
    assert (source.format, source.compression, source.delimiter) == ("csv", "gzip", "\t")
    assert all_rows(source, ["content", "score"]) == [
        {"content": "héllo ☕", "score": "1.5"},
        {"content": "", "score": ""},
        {"content": 'quote " and\nnewline', "score": ""},
    ]


def test_jsonl_export(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    naive = dt.datetime(2024, 1, 2, 3, 4, 5, 600000)
    aware = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    batch = pa.record_batch(
        {
            "content": ["日本語 ☕", None],
            "score": [float("nan"), float("inf")],
            "at": pa.array([naive, None], pa.timestamp("us")),
            "at_utc": pa.array([aware, aware], pa.timestamp("s", tz="UTC")),
            "at_india": pa.array([aware, aware], pa.timestamp("ms", tz="+05:30")),
            "at_ns": pa.array([1_700_000_000_123_456_789, None], pa.timestamp("ns")),
            "day": [dt.date(2024, 1, 2), None],
            "raw": pa.array([b"\x00\xff", None], pa.binary()),
            "nested": [{"xs": [1.0, float("nan")]}, None],
        }
    )
    with OutputWriter(path) as writer:
        writer.write_batch(batch)
    text = path.read_text(encoding="utf-8")
    assert "日本語 ☕" in text  # not \u-escaped
    lines = [json.loads(line) for line in text.splitlines()]
    assert [list(line) for line in lines] == [batch.schema.names] * 2  # keys in column order
    assert lines[0] == {
        "content": "日本語 ☕",
        "score": None,
        "at": "2024-01-02T03:04:05.600000",
        "at_utc": "2024-01-02T03:04:05Z",
        "at_india": "2024-01-02T08:34:05.000+05:30",
        "at_ns": "2023-11-14T22:13:20.123456789",
        "day": "2024-01-02",
        "raw": base64.b64encode(b"\x00\xff").decode(),
        "nested": {"xs": [1.0, None]},
    }
    assert lines[1]["score"] is None and lines[1]["content"] is None


def test_jsonl_gz_export_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl.gz"
    with OutputWriter(path) as writer:
        writer.write_batch(sample_batch())
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert [json.loads(line)["row_id"] for line in lines] == [0, 1, 2]
    assert all_batches(open_input(path)).column("content").to_pylist() == sample_batch().column(1).to_pylist()


@pytest.mark.parametrize("name", ["out.parquet", "out.csv.gz", "out.jsonl"])
def test_export_is_atomic(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match="boom"), OutputWriter(path) as writer:
        writer.write_batch(sample_batch())
        assert (tmp_path / f".{name}.tmp-{os.getpid()}").exists()
        raise RuntimeError("boom")
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_export_replaces_only_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    writer = OutputWriter(path)
    writer.write_batch(sample_batch())
    assert path.read_text() == "old\n"
    writer.close()
    writer.close()  # a second close does nothing
    assert [json.loads(line)["row_id"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_empty_export_keeps_the_schema(tmp_path: Path) -> None:
    schema = sample_batch().schema
    with OutputWriter(tmp_path / "out.parquet", schema=schema):
        pass
    assert pq.read_schema(tmp_path / "out.parquet").names == schema.names
    with OutputWriter(tmp_path / "out.csv", schema=schema):
        pass
    assert (tmp_path / "out.csv").read_text() == '"row_id","content","score"\n'


def test_writer_refuses_a_batch_of_another_schema(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schema"), OutputWriter(tmp_path / "out.csv") as writer:
        writer.write_batch(sample_batch())
        writer.write_batch(pa.record_batch({"other": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_writer_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "out.csv"
    with pytest.raises(UsageError, match="does not exist") as info:
        OutputWriter(path)
    assert str(path) in str(info.value)


def test_export_from_input_batches(tmp_path: Path) -> None:
    source_path = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}", "x": i if i % 2 else "odd"} for i in range(1000)]
    )
    source = open_input(source_path)
    out = tmp_path / "copy.parquet"
    with OutputWriter(out) as writer:
        for batch in source.iter_batches(batch_size=128):
            writer.write_batch(batch)
    table = pq.read_table(out)
    assert table.num_rows == 1000
    assert table.column("prompt").to_pylist() == [f"p{i}" for i in range(1000)]
    assert table.column("x").to_pylist()[:2] == ["odd", "1"]
    assert table.schema.field("id").type == pa.int64()


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv.gz", "jsonl.gz"])
def test_iter_rows_from_a_start_row_equals_the_full_read_from_there(tmp_path: Path, kind: str) -> None:
    n = 1_000
    frame = pd.DataFrame({"id": range(n), "text": [f"row {i}, with a comma" for i in range(n)]})
    path = tmp_path / f"in.{kind}"
    if kind == "parquet":
        frame.to_parquet(path, row_group_size=97)  # row groups that do not line up with batches
    elif kind == "jsonl.gz":
        lines = [frame.iloc[i : i + 1].to_json(orient="records", lines=True) for i in range(n)]
        with gzip.open(path, "wt") as fh:
            fh.write("\n".join(lines[:500]) + "\n\n   \n" + "\n".join(lines[500:]) + "\n")  # blank lines
    else:
        frame.to_csv(path, index=False, sep="\t" if kind.startswith("tsv") else ",")
    source = open_input(path)
    full = [row for batch in source.iter_rows(["id", "text"], 64) for row in batch]
    assert len(full) == n
    for start in (0, 1, 96, 97, 98, 500, 501, 999, 1_000, 5_000):
        batches = list(source.iter_rows(["id", "text"], 64, start=start))
        assert [row for batch in batches for row in batch] == full[start:]
        assert all(len(batch) == 64 for batch in batches[:-1])
    with pytest.raises(ValueError, match="start"):
        source.iter_rows(["id"], 64, start=-1)
