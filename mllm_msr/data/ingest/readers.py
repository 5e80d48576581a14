"""Line-level readers of CSV and text (JSONL, TSV) files: a bad line is a row, never an error.

Ray Data's ``read_csv`` and ``read_text`` fail the whole read on one malformed row or one
undecodable byte ("Failed to read CSV file", ``UnicodeDecodeError``). These readers stream a file
line by line (bounded memory) and emit every record with its physical line number (1-based, the
CSV header is line 1). A record that cannot be decoded or parsed is still emitted, with null
values and an error reason:

- ``not_utf8``: a line of the record is not valid UTF-8;
- ``malformed_row`` (CSV): a wrong number of fields, a quoted field left open until the end of
  the file (or longer than ``csv.field_size_limit()``) or any other ``csv.Error``. The parser
  then resumes at the line after the record's first line, so an unterminated quote costs one
  row, not the rest of the file.

Extra columns :data:`LINE`, :data:`ERROR` and :data:`DETAIL` carry this; the adapters turn an
error into a quarantine row (:func:`mllm_msr.data.ingest.common.reader_reject`). Blank lines are
not records and are skipped.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

LINE = "_ingest_line"
ERROR = "_ingest_error"
DETAIL = "_ingest_detail"
TEXT = "text"
READER_FIELDS = [(LINE, pa.int64()), (ERROR, pa.string()), (DETAIL, pa.string())]
BLOCK_ROWS = 50_000
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_UNTERMINATED = "unterminated quoted field at end of file"


def iter_lines(f: Any) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a binary stream; every line ends with ``b"\\n"``."""
    rest = b""
    n = 0
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            n += 1
            yield n, (part[3:] if n == 1 and part.startswith(_BOM) else part) + b"\n"
    if rest:
        n += 1
        yield n, (rest[3:] if n == 1 and rest.startswith(_BOM) else rest) + b"\n"


def _decode(raw: bytes) -> tuple[str, str | None]:
    """The text of ``raw`` and, when it is not UTF-8, the decoder's message."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", "replace"), f"{exc}: {raw[:200]!r}"


def text_records(f: Any) -> Iterator[dict]:
    """Non-blank lines of a text file: ``{LINE, TEXT, ERROR, DETAIL}`` (text null if undecodable)."""
    for n, raw in iter_lines(f):
        if not raw.strip():
            continue
        text, error = _decode(raw)
        if error is None:
            yield {LINE: n, TEXT: text.rstrip("\r\n"), ERROR: None, DETAIL: None}
        else:
            yield {LINE: n, TEXT: None, ERROR: "not_utf8", DETAIL: error}


class _Lines:
    """Decoded lines for ``csv.reader``, remembering the lines of the record being parsed.

    Lines pushed back (:meth:`resume_after_first`) are served again, so that the parser can
    restart inside a record it could not parse.
    """

    def __init__(self, lines: Iterator[tuple[int, bytes]]) -> None:
        self.lines = lines
        self.back: deque[tuple[int, bytes]] = deque()
        self.taken: list[tuple[int, bytes]] = []
        self.not_utf8: str | None = None
        self.eof = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.back:
            item = self.back.popleft()
        else:
            item = next(self.lines, None)
            if item is None:
                self.eof = True
                raise StopIteration
        self.taken.append(item)
        text, error = _decode(item[1])
        if error is not None and self.not_utf8 is None:
            self.not_utf8 = f"line {item[0]}: {error}"
        return text

    def start_record(self) -> None:
        self.taken, self.not_utf8, self.eof = [], None, False

    def resume_after_first(self) -> None:
        """Parse again from the second line of the current record."""
        self.back.extendleft(reversed(self.taken[1:]))


def csv_records(f: Any) -> Iterator[tuple[int, list[str] | None, str | None, str | None]]:
    """``(line, fields, error, detail)`` per record of a CSV stream; the header comes first.

    ``fields`` is None when the record is rejected; records with a field count other than the
    header's are rejected (``malformed_row``) here.
    """
    src = _Lines(iter_lines(f))
    reader = csv.reader(src)
    width = None
    while True:
        src.start_record()
        error = detail = None
        try:
            fields = next(reader)
        except StopIteration:
            if not src.taken:
                return
            fields, error, detail = None, "malformed_row", _UNTERMINATED
        except csv.Error as exc:
            fields, error, detail = None, "malformed_row", f"csv: {exc}"
        else:
            if not fields:
                continue  # a blank line
            if src.eof:  # the parser needed the end of the file to close a quoted field
                error, detail = "malformed_row", _UNTERMINATED
            elif width is not None and len(fields) != width:
                error = "malformed_row"
                detail = f"expected {width} fields, got {len(fields)}"
        line = src.taken[0][0] if src.taken else 0
        if error is not None:
            if len(src.taken) > 1:  # the record's end is not trustworthy: only its 1st line goes
                src.resume_after_first()
            yield line, None, error, f"{detail}: {src.taken[0][1][:200]!r}"
        elif src.not_utf8 is not None:
            yield line, None, "not_utf8", src.not_utf8
        else:
            if width is None:
                width = len(fields)
            yield line, fields, None, None


def csv_header(path: str) -> list[str]:
    """Column names of a CSV file (its first record), read without loading the file.

    ``path``: a local path or a pyarrow URI (``s3://...``).

    Raises ``ValueError`` when the header itself cannot be decoded or parsed.
    """
    from mllm_msr.data.ingest.files import open_input

    with open_input(path) as fh:
        for line, fields, error, detail in csv_records(fh):
            if error is not None:
                raise ValueError(f"{path}:{line}: unreadable CSV header ({error}: {detail})")
            return fields
    return []


def _blocks(rows: Iterator[dict], schema: pa.Schema) -> Iterator[pa.Table]:
    """``rows`` as tables of at most :data:`BLOCK_ROWS` rows (one empty table when none)."""

    def table(batch: list[dict]) -> pa.Table:
        return pa.table({f.name: [r.get(f.name) for r in batch] for f in schema}, schema=schema)

    batch: list[dict] = []
    yielded = False
    for row in rows:
        batch.append(row)
        if len(batch) >= BLOCK_ROWS:
            yield table(batch)
            batch, yielded = [], True
    if batch or not yielded:
        yield table(batch)


def csv_blocks(f: Any, names: list[str]) -> Iterator[pa.Table]:
    """Tables of a CSV stream's records (string columns ``names`` + reader columns)."""
    schema = pa.schema([*((n, pa.string()) for n in dict.fromkeys(names)), *READER_FIELDS])

    def rows() -> Iterator[dict]:
        records = csv_records(f)
        next(records, None)  # the header
        for line, fields, error, detail in records:
            if fields is None:
                yield {LINE: line, ERROR: error, DETAIL: detail}
            else:
                row = dict(zip(names, fields))
                row[LINE] = line
                yield row

    return _blocks(rows(), schema)


def text_blocks(f: Any) -> Iterator[pa.Table]:
    """Tables of a text stream's non-blank lines (``text`` + reader columns)."""
    return _blocks(text_records(f), pa.schema([(TEXT, pa.string()), *READER_FIELDS]))


def _datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class LineDatasource(FileBasedDatasource):
        """CSV (``names`` given) or text files read by :func:`csv_blocks` / :func:`text_blocks`."""

        def __init__(self, paths: str | list[str], names: list[str] | None = None) -> None:
            super().__init__(paths)
            self.names = names

        def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
            if self.names is None:
                yield from text_blocks(f)
            else:
                yield from csv_blocks(f, self.names)

    return LineDatasource


def read_lines(path: str, num_blocks: int | None = None) -> Any:
    """A Ray Dataset of a text file's lines (see :func:`text_blocks`); never fails on a line."""
    import ray.data

    return ray.data.read_datasource(_datasource_cls()(path), override_num_blocks=num_blocks)


def read_csv_rows(path: str, num_blocks: int | None = None) -> tuple[Any, list[str]]:
    """A Ray Dataset of a CSV file's records (every column a string) and its column names."""
    import ray.data

    names = csv_header(path)
    ds = ray.data.read_datasource(_datasource_cls()(path, names), override_num_blocks=num_blocks)
    return ds, names
