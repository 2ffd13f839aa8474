"""Reading the rows of one dataset file, line by line, with where each row came from.

A dataset is user data of unknown hygiene: one line that is not UTF-8, a stray CRLF, a BOM, or a
truncated last line must cost that line, not the run. So JSONL is decoded *per line*: a line
that cannot be decoded or parsed becomes a :class:`RawRow` with a ``problem`` and its line number
(the caller counts it as skipped), and every other line still parses. What cannot be read at all
(a missing or compressed file, UTF-16 that does not decode, a parquet file that is not one or
has none of the columns we read) raises :class:`FileProblem`, naming the file and the cause.

Light module: no torch. Parquet needs pyarrow (imported only for parquet files).
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# A line longer than this is skipped rather than parsed: one runaway line (a log dump, a base64
# blob) would otherwise take memory out of proportion with any real conversation.
MAX_LINE_BYTES = 16 * 2**20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"


class FileProblem(ValueError):
    """A whole file cannot be read as rows; the message names the cause (the caller adds the
    file)."""


@dataclass(frozen=True)
class RawRow:
    """One row of a file: ``value`` parsed, or ``problem`` saying why it could not be.

    ``where`` is what a person looks for in an editor: ``line 23`` (JSONL, 1-based physical
    lines, blank lines included), ``item 4`` (JSON array, 1-based) or ``row 7`` (parquet)."""

    where: str
    value: Any = None
    problem: str | None = None


def _line_problem(exc: json.JSONDecodeError, line: str) -> str:
    # a line cut short (a truncated download, an editor that stopped mid-row) reads differently
    # from text that was never JSON: say which, it points at a different fix
    cut = exc.pos >= len(line.rstrip()) - 1 or exc.msg.startswith("Unterminated string")
    if cut and line.lstrip().startswith(("{", "[")):
        return "truncated JSON"
    return "not JSON"


def jsonl_rows(data: bytes) -> Iterator[RawRow]:
    """Rows of JSON Lines bytes: UTF-8 (a leading BOM is dropped), LF or CRLF line ends."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # UTF-16 with a BOM (Windows "Unicode" exports): decodable as a whole, then line by line
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise FileProblem(
                f"UTF-16 byte-order mark but not valid UTF-16 (byte {exc.start})"
            ) from None
        data = text.encode("utf-8")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if len(raw) > MAX_LINE_BYTES:
            yield RawRow(
                f"line {number}", problem=f"line longer than {MAX_LINE_BYTES // 2**20} MiB"
            )
            continue
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            if raw.strip():  # one reason for every such line, so they count together
                yield RawRow(f"line {number}", problem="not UTF-8")
            continue
        if not line.strip():
            continue  # blank lines are not rows (a trailing newline, spacing)
        try:
            yield RawRow(f"line {number}", value=json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRow(f"line {number}", problem=_line_problem(exc, line))
        except RecursionError:
            yield RawRow(f"line {number}", problem="nested too deeply")


def json_array_rows(text: str) -> Iterator[RawRow]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileProblem(
            f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(items, list):
        raise FileProblem("a .json file must hold an array of rows (or one JSON object per line)")
    for number, item in enumerate(items, start=1):
        yield RawRow(f"item {number}", value=item)


def parquet_rows(data: bytes) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data.startswith(PARQUET_MAGIC) or not data.endswith(PARQUET_MAGIC):
        raise FileProblem(
            "not a parquet file (truncated or another format: no PAR1 marker at both ends)"
        )
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FileProblem(f"unreadable parquet: {exc}") from None
    columns = table.column_names
    if "messages" not in columns and not {"prompt", "response"} <= set(columns):
        raise FileProblem(
            f"parquet schema has no `messages` column and no `prompt` + `response` columns "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    for number, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(f"row {number}", value=row)


def file_rows(name: str, data: bytes) -> Iterator[RawRow]:
    """Rows of one file's bytes, by its name's suffix (anything else is read as JSONL)."""
    if data.startswith(GZIP_MAGIC) or data.startswith(ZSTD_MAGIC):
        raise FileProblem(
            "compressed file: decompress it (rows are read as plain JSONL/JSON/parquet)"
        )
    if name.endswith(".parquet"):
        yield from parquet_rows(data)
        return
    if data.startswith(PARQUET_MAGIC):
        raise FileProblem("a parquet file without the .parquet suffix: rename it")
    if name.endswith(".json"):
        head = data[:4096].lstrip(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"["):
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise FileProblem(
                    f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                ) from None
            yield from json_array_rows(text)
            return
    yield from jsonl_rows(data)
