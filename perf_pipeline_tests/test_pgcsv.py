"""PostgreSQL CSV → Arrow (lib/pgcsv.py, shared by the archive and the exports): every cell survives.

The module's database holds one day (2026-02-24) of audit_log and usage_log rows whose text is what a CSV
reader likes to turn into NULL (``NA``, ``N/A``, ``n/a``, ``NULL``, ``null``, ``nan``, ``NaN``, ``-nan``,
``#N/A`` and the rest of pyarrow's default list) in every text column, a provider named ``nan``, jsonb
``null`` / ``"null"`` / ``"NA"``, empty strings next to NULLs, quotes, newlines, unicode, numeric(12,4) edge
values, microsecond timestamps and IPv6 addresses. An export of that day is compared with the database
cell by cell: the Parquet file with the values psycopg reads, the csv.gz file with PostgreSQL's own text of
each value (read with a tokenizer that tells a NULL from ''). Row count, bytes and sha256 cannot show a
cell turned into NULL; this does.
"""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import itertools
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg.types.json import Jsonb
from psycopg.types.string import TextLoader

from perf_pipeline.lib import exports as ex
from perf_pipeline.lib import pgcsv

TODAY = dt.date(2026, 3, 2)
RETENTION = {"audit_log": 12, "usage_log": 24}
REQUESTER = "00000000-0000-4000-8000-0000000000cc"

#: every spelling pyarrow's CSV reader treats as NULL by default, and a few more a reader might
NULLISH = [
    "NA",
    "N/A",
    "n/a",
    "NULL",
    "null",
    "nan",
    "NaN",
    "-nan",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "1.#IND",
    "1.#QNAN",
    "None",
    "none",
    " NA ",
    "\\N",
    "t",
    "f",
]
AWKWARD = [
    "",
    " ",
    '"',
    '""',
    ",",
    'said "hi", then\nleft; a \\ backslash',
    "line\r\nbreak",
    "tab\there",
    "émoji ✓ 日本語 עברית",
    "x" * 2000,
]
TEXTS = NULLISH + AWKWARD
DETAILS: list[Any] = [
    None,  # SQL NULL
    "json-null",  # jsonb null
    "null",
    "NA",
    "nan",
    "",
    {"k": None, "NA": "nan", "q": 'it\'s "quoted"', "nested": {"a": [1, None, "N/A"]}},
    [],
    {},
    1e-7,
    123456789012345678901234567890,
    True,
]
IPS = [
    None,
    "2001:db8::1",
    "::",
    "::1",
    "::ffff:192.0.2.1",
    "2001:db8::/32",
    "fe80::1:2:3:4",
    "192.0.2.1",
    "10.0.0.0/8",
]
TIMESTAMPS = [
    "2026-02-24 00:00:00+00",
    "2026-02-24 10:00:00.123456+00",
    "2026-02-24 23:59:59.999999+00",
    "2026-02-24 12:30:00.000001+05:30",
    "2026-02-24 08:00:00.5+00",
]
PROVIDERS = ["nan", "null", "none", "na", "n-a", "-nan", "t", "f", "whisper"]
COSTS = ["0", "0.0001", "12345678.1234", "99999999.9999", "1.5"]
DURATIONS = ["0", "0.01", "12345678.99", "60"]


@pytest.fixture(scope="module")
def awkward(db_url: str) -> str:
    users = itertools.cycle([None, "11111111-2222-4333-8444-555555555555", str(uuid.UUID(int=1))])
    details = itertools.cycle(DETAILS)
    ips = itertools.cycle(IPS)
    stamps = itertools.cycle(TIMESTAMPS)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i, text in enumerate(TEXTS * 2):
            nullable = None if i >= len(TEXTS) and i % 3 == 0 else text  # NULLs next to the same texts
            detail = next(details)
            conn.execute(
                "INSERT INTO audit_log (timestamp, user_id, entity_type, entity_id, event_type, operation, "
                "severity, description, details, ip) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "CASE WHEN %s THEN 'null'::jsonb ELSE %s::jsonb END, %s)",
                (
                    next(stamps),
                    next(users),
                    nullable[:64] if nullable is not None else None,
                    nullable[:128] if nullable is not None else None,
                    text[:64] or "-",
                    text[:32] or "-",
                    ("low", "medium", "high", "critical")[i % 4],
                    nullable,
                    detail == "json-null",
                    None if detail in (None, "json-null") else Jsonb(detail),
                    next(ips),
                ),
            )
        sessions = itertools.cycle([None, str(uuid.UUID(int=7))])
        costs, durations = itertools.cycle(COSTS), itertools.cycle(DURATIONS)
        for i, provider in enumerate(PROVIDERS * 3):
            conn.execute(
                "INSERT INTO usage_log (user_id, session_id, created_at, duration_minutes, cost_usd, "
                "is_billable, stt_provider) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    str(uuid.UUID(int=i + 100)),
                    next(sessions),
                    next(stamps),
                    next(durations),
                    next(costs),
                    i % 2 == 0,
                    provider,
                ),
            )
    return db_url


def _export(url: str, kind: str, fmt: str, folder: Path) -> Path:
    with psycopg.connect(url, autocommit=True) as conn:
        request_id = ex.file_request(conn, REQUESTER, kind, fmt, {"start": "2026-02-24", "end": "2026-02-24"})
    result = ex.run_export(
        url, request_id, folder, statement_timeout_s=60, retention_months=RETENTION, today=TODAY
    )
    return result.path


def _db_rows(url: str, kind: str, *, as_text: bool) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The rows of 2026-02-24 read with psycopg: every value as PostgreSQL's text (``as_text``), else
    typed values with uuid / jsonb / inet as PostgreSQL's text."""
    names = ex.KINDS[kind].schema.names
    time_col = names[1] if kind == "audit_log" else names[3]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        text_types = ["uuid", "jsonb", "inet"]
        if as_text:
            text_types += ["timestamptz", "numeric", "bool", "int8"]
        for name in text_types:
            conn.adapters.register_loader(name, TextLoader)
        columns = ", ".join(f'"{n}"' for n in names)
        rows = conn.execute(
            f'SELECT {columns} FROM {kind} WHERE "{time_col}" >= %s AND "{time_col}" < %s',
            (dt.datetime(2026, 2, 24, tzinfo=dt.UTC), dt.datetime(2026, 2, 25, tzinfo=dt.UTC)),
        ).fetchall()
    return list(names), rows


def _read_pg_csv(text: str) -> list[list[str | None]]:
    """PostgreSQL's CSV: an unquoted empty field is NULL, a quoted one is '' (Python's csv cannot tell)."""
    rows: list[list[str | None]] = []
    row: list[str | None] = []
    i, n = 0, len(text)
    while i < n:
        value: str | None
        if text[i] == '"':
            parts, j = [], i + 1
            while True:
                k = text.index('"', j)
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            value = "".join(parts)
        else:
            k = i
            while k < n and text[k] not in ",\n":
                k += 1
            value = text[i:k] or None
            i = k
        row.append(value)
        if i >= n or text[i] == "\n":
            rows.append(row)
            row = []
        i += 1
    return rows


def _by_id(rows: list[Any]) -> dict[str, tuple[Any, ...]]:
    out = {str(r[0]): tuple(r) for r in rows}
    assert len(out) == len(rows)
    return out


@pytest.mark.parametrize("fmt", ex.FORMATS)
@pytest.mark.parametrize("kind", list(ex.KINDS))
def test_every_cell_of_an_export_equals_the_database(
    awkward: str, scratch_dir: Path, kind: str, fmt: str
) -> None:
    path = _export(awkward, kind, fmt, scratch_dir)
    names, db_rows = _db_rows(awkward, kind, as_text=fmt == "csv.gz")
    if fmt == "parquet":
        table = pq.read_table(path)
        assert table.schema == ex.KINDS[kind].schema
        header, file_rows = table.column_names, [tuple(r.values()) for r in table.to_pylist()]
    else:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            header, *file_rows = _read_pg_csv(fh.read())
    assert header == names
    expected, got = _by_id(db_rows), _by_id(file_rows)
    assert sorted(got) == sorted(expected) and len(expected) >= 25
    differing = [
        (row_id, name, want, have)
        for row_id, want_row in expected.items()
        for name, want, have in zip(names, want_row, got[row_id], strict=True)
        if want != have or type(want) is not type(have)
    ]
    assert not differing, f"{len(differing)} cells differ, e.g. {differing[:5]}"
    if kind == "audit_log":  # the data really holds what the test is about
        descriptions = {r[names.index("description")] for r in db_rows}
        assert set(NULLISH) | {"", None} <= descriptions
        details = {r[names.index("details")] for r in db_rows}
        assert {"null", '"null"', '"NA"', None} <= details
    else:
        assert {"nan", "null"} <= {r[names.index("stt_provider")] for r in db_rows}


def test_parse_keeps_postgresql_spellings_apart() -> None:
    schema = pa.schema(
        [
            ("s", pa.string()),
            ("b", pa.bool_()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("d", pa.decimal128(12, 4)),
            ("n", pa.int64()),
        ]
    )
    text = (
        b"NA,t,2026-02-24 10:00:00.123456,12345678.1234,1\n"
        b",f,,,\n"
        b'"",t,2026-02-24 23:59:59.999999,0.0001,\n'
        b'"multi\nline ""q""",f,2026-02-24 00:00:00,0,-5\n'
    )
    for value in NULLISH:
        text += f"{value},t,2026-02-24 00:00:00,1,2\n".encode()
    table = pgcsv.parse(text, schema)
    rows = table.to_pylist()
    assert table.schema == schema
    assert rows[0] == {
        "s": "NA",
        "b": True,
        "ts": dt.datetime(2026, 2, 24, 10, 0, 0, 123456, tzinfo=dt.UTC),
        "d": decimal.Decimal("12345678.1234"),
        "n": 1,
    }
    assert rows[1] == {"s": None, "b": False, "ts": None, "d": None, "n": None}
    assert rows[2]["s"] == "" and rows[3]["s"] == 'multi\nline "q"'
    assert [r["s"] for r in rows[4:]] == NULLISH


def test_record_batches_cut_on_record_boundaries() -> None:
    records = [b'1,"a\nb"\n', b'2,"x"",\n""y"\n', b"3,plain\n"] * 50
    stream = b"".join(records)
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]  # boundaries anywhere, mid-quote too
    batches = list(pgcsv.record_batches(chunks, 64))
    assert b"".join(batches) == stream and len(batches) > 5
    schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
    assert sum(pgcsv.parse(b, schema).num_rows for b in batches) == 150
