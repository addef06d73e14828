"""PostgreSQL's CSV (``COPY … TO STDOUT (FORMAT csv)``) → Arrow: the one conversion the archive and the
exports share.

What PostgreSQL writes, and how it is read here:

* **NULL is an unquoted empty field, '' is a quoted one** (``""``). Only the unquoted empty field is
  NULL (``null_values=[""]``, ``quoted_strings_can_be_null=False``). pyarrow's default list of null
  spellings (``NA``, ``N/A``, ``n/a``, ``NULL``, ``null``, ``nan``, ``NaN``, ``-nan``, ``#N/A``, …) must never
  apply: those are ordinary text (a description, an entity id, a provider named ``nan``, jsonb ``null``).
* **Booleans print as t / f.**
* **timestamptz columns are selected ``AT TIME ZONE 'UTC'``** (:func:`select_list`): they arrive as naive
  UTC text, are read as naive timestamps and labelled UTC without shifting (pyarrow refuses a naive text
  for a zone-aware type, and the session's TimeZone must not matter).
* **Other types keep their text form** (uuid, jsonb, inet, …: byte for byte as PostgreSQL prints them).
* **One block per batch.** With ``newlines_in_values`` a record longer than pyarrow's block (an audit
  ``details`` of several MiB) fails with "straddling object"; a batch is in memory already, so it is
  parsed as a single block, which costs nothing more. Batches must therefore end on a record boundary:
  :func:`record_batches` cuts a COPY stream there; a stream of whole COPY messages (one row each) is
  already cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

#: smallest pyarrow block asked for (a batch is always parsed as one block, see the module docstring)
MIN_BLOCK_BYTES = 1 << 20
PARSE_OPTIONS = pacsv.ParseOptions(newlines_in_values=True)


def _read_type(arrow: pa.DataType) -> pa.DataType:
    # zone-aware timestamps are read from naive UTC text (selected AT TIME ZONE 'UTC'), labelled after
    return pa.timestamp(arrow.unit) if pa.types.is_timestamp(arrow) and arrow.tz else arrow


def select_list(schema: pa.Schema) -> sql.Composed:
    """The SELECT list of ``schema``'s columns (by name) with zone-aware timestamps as naive UTC text
    (``col AT TIME ZONE 'UTC' AS col``), as :func:`parse` expects them."""
    items = []
    for f in schema:
        ident = sql.Identifier(f.name)
        if pa.types.is_timestamp(f.type) and f.type.tz:
            items.append(sql.SQL("{} AT TIME ZONE 'UTC' AS {}").format(ident, ident))
        else:
            items.append(ident)
    return sql.SQL(", ").join(items)


def read_options(schema: pa.Schema, batch_bytes: int) -> pacsv.ReadOptions:
    """No header (COPY without HEADER), ``schema``'s names, and one block for the whole batch."""
    return pacsv.ReadOptions(
        column_names=schema.names,
        use_threads=False,
        block_size=max(MIN_BLOCK_BYTES, batch_bytes + 1),
    )


def convert_options(schema: pa.Schema) -> pacsv.ConvertOptions:
    """PostgreSQL's spellings: NULL only as an unquoted empty field, t / f, timestamps as naive UTC."""
    return pacsv.ConvertOptions(
        column_types={f.name: _read_type(f.type) for f in schema},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        true_values=["t"],
        false_values=["f"],
    )


def parse(batch: bytes | bytearray | memoryview, schema: pa.Schema) -> pa.Table:
    """Parse one record-aligned piece of COPY CSV (no header) into a table of ``schema``.

    Cost: one pass of pyarrow's CSV reader over the batch, single-threaded; memory about twice the
    batch (text and columns). Raises ``pyarrow.ArrowInvalid`` on text that does not fit the schema.
    """
    table = pacsv.read_csv(
        pa.py_buffer(batch), read_options(schema, len(batch)), PARSE_OPTIONS, convert_options(schema)
    )
    return pa.table([table[f.name].cast(f.type) for f in schema], schema=schema)


def record_end(buf: bytearray, tail: int = 1 << 20) -> int:
    """Offset just past the last complete CSV record in ``buf`` (0 if none).

    In PostgreSQL's CSV a newline ends a record iff an even number of quote characters precede it
    (quotes inside values are doubled). Only the last ``tail`` bytes are inspected with NumPy; the
    quotes before them are counted by ``bytearray.count`` (C speed, no allocation).
    """
    lo = max(0, len(buf) - tail)
    while True:
        before = buf.count(b'"', 0, lo)
        window = np.frombuffer(memoryview(buf)[lo:], dtype=np.uint8)
        newlines = np.flatnonzero(window == 10)
        quotes = np.flatnonzero(window == 34)
        even = newlines[(np.searchsorted(quotes, newlines) + before) % 2 == 0]
        cut = lo + int(even[-1]) + 1 if even.size else 0
        del window  # release the buffer export: the caller resizes ``buf``
        if cut or lo == 0:
            return cut
        lo = max(0, lo - 8 * tail)  # a record longer than the tail: look further back


def record_batches(chunks: Iterable[bytes], batch_bytes: int) -> Iterator[bytes]:
    """Regroup COPY CSV output into ~``batch_bytes`` pieces ending on a record boundary (whatever the
    chunks' boundaries). Memory: about two batches."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) < batch_bytes:
            continue
        cut = record_end(buf)
        if cut:
            batch = bytes(buf[:cut])
            del buf[:cut]
            yield batch
    if buf:
        yield bytes(buf)
