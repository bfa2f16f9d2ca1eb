"""An export's rows as Arrow tables straight from PostgreSQL: `COPY ... TO STDOUT` streams them
as CSV and pyarrow parses them column-wise, JSON columns included.

The row path (`export.iter_batches`) has psycopg build a Python tuple per row and decode its
JSON columns, and pyarrow then build list and map columns from those objects: most of a
1,000,000-caption Parquet export's time (issue 25). Here no Python object is made per row.
PostgreSQL sends each column as its plain text (building each row's JSON there instead cost
the server five times as much); the `alternatives` and `tags` texts are joined by pyarrow into
JSON lines and parsed by its JSON reader, `tags` first rewritten from an object to key/value
pairs (a map has no JSON reader). The tables hold what the row path gives `ParquetFile`: the
same schema, values and JSON text of `extra`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
from psycopg import sql
from sqlalchemy import Engine

from capworks.export import BATCH_ROWS, Window
from capworks.export_formats import PARQUET_SCHEMA

READ_BYTES = 4 << 20  # of CSV parsed at once (~10,000 captions)
_NAMES = PARQUET_SCHEMA.names
_TEXT = pa.schema([(name, pa.string()) for name in _NAMES])
_JSON = pa.schema(
    [
        PARQUET_SCHEMA.field("alternatives"),
        ("tags", pa.list_(pa.struct([("key", pa.string()), ("value", pa.float64())]))),
    ]
)
# A tag of jsonb's text form (`{"red": 0.82, "bus": 1.0}`: a key string, then a number) as a
# key/value object. A JSON string token is matched whole, so a key holding `": ` is one key.
_TAG = r'("(?:[^"\\]|\\.)*"): ([^,}]+)'
_TAG_PAIR = r'{"key":\1,"value":\2}'

_ROWS = """
    SELECT i.uri, i.bucket, i.key, i.etag, i.source_id,
           CASE WHEN json_typeof(i.extra) = 'null' THEN NULL ELSE i.extra::text END,
           c.model_id, c.revision, c.settings_hash, c.text, c.score, c.alternatives::text,
           c.tags::text, c.created
    FROM captions AS c JOIN images AS i ON c.image_id = i.id
    WHERE {where}
"""


def copy_statement(window: Window) -> sql.Composed:
    """The COPY of the window's rows as CSV (its values bound client-side)."""
    where: list[sql.Composable] = [sql.SQL("true")]
    if window.model is not None:
        where.append(sql.SQL("c.model_id = {}").format(sql.Literal(window.model)))
    if window.since is not None:
        where.append(sql.SQL("c.created > {}").format(sql.Literal(window.since)))
    if window.until is not None:
        where.append(sql.SQL("c.created <= {}").format(sql.Literal(window.until)))
    query = sql.SQL(_ROWS).format(where=sql.SQL(" AND ").join(where))
    return sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(query)


def iter_tables(db: Engine, window: Window, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The window's rows as tables of `PARQUET_SCHEMA`, `batch_rows` each (the last fewer),
    holding one batch and one read of CSV in memory at a time (PostgreSQL only)."""
    pending: list[pa.Table] = []
    held = 0
    for table in _iter_parsed(db, window):
        pending.append(table)
        held += table.num_rows
        while held >= batch_rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, batch_rows)
            pending, held = [whole.slice(batch_rows)], held - batch_rows
    if held:
        yield pa.concat_tables(pending)


def _iter_parsed(db: Engine, window: Window) -> Iterator[pa.Table]:
    """Tables of the CSV the COPY sends, a read of about `READ_BYTES` at a time (cut between
    rows: the COPY sends one row a message)."""
    with db.connect() as conn:
        raw: Any = conn.connection.dbapi_connection  # a psycopg connection
        with raw.cursor() as cursor:
            cursor.execute("SET LOCAL TIME ZONE 'UTC'")  # times as `...+00`
            with cursor.copy(copy_statement(window)) as copy:
                lines = bytearray()
                for row in copy:
                    lines += row
                    if len(lines) >= READ_BYTES:
                        yield parse_csv(bytes(lines))
                        lines.clear()
                if lines:
                    yield parse_csv(bytes(lines))


def parse_csv(lines: bytes) -> pa.Table:
    """Whole rows of the COPY's CSV, parsed into a table of `PARQUET_SCHEMA`."""
    text = pacsv.read_csv(
        pa.BufferReader(lines),
        read_options=pacsv.ReadOptions(column_names=_NAMES, block_size=len(lines) + 1),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=_TEXT, strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    ).combine_chunks()
    columns = {name: text.column(name).chunk(0) for name in _NAMES}
    parsed = _json_columns(columns["alternatives"], columns["tags"])
    columns["alternatives"] = parsed.column("alternatives").chunk(0)
    tags = parsed.column("tags").chunk(0)
    pairs = tags.flatten()
    columns["tags"] = pa.MapArray.from_arrays(
        tags.offsets, pairs.field("key"), pairs.field("value")
    )
    columns["extra"] = _python_json(columns["extra"])
    for name in ("score", "created"):
        columns[name] = pc.cast(columns[name], PARQUET_SCHEMA.field(name).type)
    return pa.Table.from_arrays([columns[name] for name in _NAMES], schema=PARQUET_SCHEMA)


def _json_columns(alternatives: pa.Array, tags: pa.Array) -> pa.Table:
    """The `alternatives` and `tags` JSON texts parsed together, as JSON lines, by pyarrow."""
    inner = pc.utf8_slice_codeunits(pc.fill_null(tags, "{}"), 1, -1)  # the braces off
    pairs = pc.replace_substring_regex(inner, _TAG, _TAG_PAIR)
    lines = pc.binary_join_element_wise(
        '{"alternatives":', pc.fill_null(alternatives, "null"), ',"tags":[', pairs, "]}\n", ""
    )
    end = pc.sum(pc.binary_length(lines)).as_py() or 0  # a new array: its text starts at 0
    parsed = pajson.read_json(
        pa.BufferReader(lines.buffers()[2][:end]),
        read_options=pajson.ReadOptions(block_size=end + 1),
        parse_options=pajson.ParseOptions(
            explicit_schema=_JSON, unexpected_field_behavior="ignore", newlines_in_values=True
        ),
    )
    return parsed.combine_chunks()


def _python_json(extra: pa.Array) -> pa.Array:
    """The kept columns' JSON text as the row path writes it (`json.dumps` of the object; a
    JSON `null` is made NULL by the query, as psycopg's decoding makes it None)."""
    if extra.null_count == len(extra):
        return extra
    return pa.array(
        [None if text is None else json.dumps(json.loads(text)) for text in extra.to_pylist()],
        pa.string(),
    )
