"""User files (JSONL, TSV, Parquet) → raw rows tagged with file and line, damage reported instead of raised.

A corpus of a billion lines always has some bad ones; one undecodable line must not cost a day's build.
Readers therefore never raise on a bad line: they yield a `Row` whose `error` names the reason, and
`records.py` decides (skip and count, or stop in strict mode). Problems with a whole file (missing,
unreadable, unknown format, a TSV header without the needed columns) are raised by `check_files` before
any work starts. Blank lines are not records and are passed over silently.

Paths go through etils.epath: a local path opens as a plain file, and gs:// (or s3://) paths, which
the workers of a cluster build (Dataflow, Spark) read, open through epath's TF or fsspec backends.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from etils import epath

MAX_RECORD_BYTES = 1 << 20  # records above 1 MB are skipped as `oversized`
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".parquet": "parquet"}


class InputError(ValueError):
  """A whole input is unusable (missing, unreadable, wrong format or columns): raised before any work."""


@dataclasses.dataclass(frozen=True)
class Span:
  """A part of a JSONL/TSV file that a worker reads alone: the lines that *start* at a byte offset in
  [start, end). `first_line` is the file line number of its first line (data_pipelines.beam_build counts
  the lines of the spans before it), so that rows keep their FILE:LINE. A Parquet file is one span, read
  whole, its rows numbered by the reader."""
  start: int
  end: int
  first_line: int = 1


@dataclasses.dataclass(frozen=True)
class Row:
  """One raw record. `line` is 1-based: the file line for JSONL/TSV (the TSV header is line 1), the row
  number for Parquet. `value` is the decoded JSON value or a column → value dict; None when `error` is set."""
  path: str
  line: int
  value: Any = None
  error: str | None = None
  detail: str = ""


def file_format(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise InputError(f"{path}: unknown input format {ext!r}; expected one of {sorted(FORMATS)}")
  return FORMATS[ext]


def columns(path: str, fmt: str | None = None) -> list[str] | None:
  """Column names of a TSV (header row) or Parquet (schema) file; None for JSONL, whose keys vary by line."""
  fmt = fmt or file_format(path)
  if fmt == "tsv":
    with epath.Path(path).open("rb") as f:
      header = f.readline()
    try:
      return header.decode("utf-8").rstrip("\r\n").split("\t") if header.strip() else []
    except UnicodeDecodeError as e:
      raise InputError(f"{path}:1: TSV header is not valid UTF-8 ({e.reason})") from None
  if fmt == "parquet":
    import pyarrow.parquet as pq
    try:
      with epath.Path(path).open("rb") as f:
        return list(pq.read_schema(f).names)
    except Exception as e:  # pyarrow raises several types for a damaged footer
      raise InputError(f"{path}: not a readable Parquet file ({e})") from None
  return None


def check_files(paths: Sequence[str], required: Sequence[Sequence[str]] = (), fmt: str | None = None) -> None:
  """Raises InputError for the first input that cannot be read at all (read as `fmt`, default: by extension).

  `required` lists (feature, column, alternative columns...) tuples: a TSV or Parquet file must have one of
  the columns for every feature, since otherwise every one of its rows would be skipped.
  """
  if not paths:
    raise InputError("no input files given")
  for path in paths:
    file = epath.Path(path)
    if not file.is_file():
      raise InputError(f"{path}: no such file")
    try:
      file.open("rb").close()
    except OSError as e:
      raise InputError(f"{path}: not readable ({e.strerror or e})") from None
    names = columns(path, fmt)
    if names is None:
      continue
    for feature, *accepted in required:
      if not set(accepted) & set(names):
        raise InputError(f"{path}: no column for {feature!r} (accepted: {', '.join(accepted)}; "
                         f"the file has: {', '.join(names) or 'no columns'})")


def read_rows(path: str, fmt: str | None = None, span: Span | None = None) -> Iterator[Row]:
  """The rows of `path`, read as `fmt` ("jsonl", "tsv", "parquet"; default: by its extension); with `span`,
  only the rows of the lines starting in it (JSONL and TSV; a Parquet file's one span is all of it)."""
  fmt = fmt or file_format(path)
  if fmt == "parquet":
    if span is not None and (span.start, span.end) != (0, _size_of(path)):
      raise ValueError(f"{path}: Parquet files are read whole, not in spans")
    return _parquet_rows(path)
  return {"jsonl": _jsonl_rows, "tsv": _tsv_rows}[fmt](path, span or Span(0, _size_of(path)))


def spans(path: str, span_bytes: int, fmt: str | None = None) -> list[Span]:
  """`path` cut into spans of about `span_bytes` (the whole file for Parquet); their `first_line` is 1
  until the lines before them are counted (`lines_in`)."""
  size = _size_of(path)
  if (fmt or file_format(path)) == "parquet" or size <= span_bytes:
    return [Span(0, size)]
  return [Span(start, min(start + span_bytes, size)) for start in range(0, size, span_bytes)]


def lines_in(path: str, span: Span, fmt: str | None = None, block_bytes: int = 1 << 24) -> int:
  """The number of lines (blank ones included) that start in `span`: a line starts at byte 0 and after
  every newline. 0 for Parquet, whose rows the reader numbers itself."""
  if (fmt or file_format(path)) == "parquet":
    return 0
  count = int(span.start == 0)
  with epath.Path(path).open("rb") as f:
    f.seek(max(span.start - 1, 0))
    remaining = span.end - 1 - max(span.start - 1, 0)  # a newline at byte p starts a line at p + 1
    while remaining > 0:
      block = f.read(min(block_bytes, remaining))
      if not block:
        break
      count += block.count(b"\n")
      remaining -= len(block)
  return count


def _size_of(path: str) -> int:
  return epath.Path(path).stat().length


def _lines(path: str, span: Span) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, line without its line ending) for the non-blank lines starting in `span`."""
  with epath.Path(path).open("rb") as f:
    if span.start > 0:  # a line starts here only if the byte before is a newline
      f.seek(span.start - 1)
      if f.read(1) != b"\n":
        f.readline()
    position, number = f.tell(), span.first_line
    for line in f:
      if position >= span.end:
        break
      position += len(line)
      stripped = line.rstrip(b"\r\n")
      if stripped.strip():
        yield number, stripped
      number += 1


def _decoded(path: str, number: int, line: bytes) -> Row | str:
  if len(line) > MAX_RECORD_BYTES:
    return Row(path, number, error="oversized", detail=f"{len(line)} bytes > {MAX_RECORD_BYTES}")
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    return Row(path, number, error="undecodable", detail=f"invalid UTF-8 at byte {e.start}")


def _jsonl_rows(path: str, span: Span) -> Iterator[Row]:
  for number, line in _lines(path, span):
    text = _decoded(path, number, line)
    if isinstance(text, Row):
      yield text
      continue
    try:
      yield Row(path, number, json.loads(text))
    except json.JSONDecodeError as e:
      yield Row(path, number, error="malformed_json", detail=f"{e.msg} at column {e.colno}")


def _tsv_rows(path: str, span: Span) -> Iterator[Row]:
  """Tab-separated, no quoting (a text containing a tab must have it escaped); the first line names columns."""
  header = columns(path, "tsv")
  for number, line in _lines(path, span):
    if number == 1:
      continue
    text = _decoded(path, number, line)
    if isinstance(text, Row):
      yield text
      continue
    cells = text.split("\t")
    if len(cells) != len(header):
      yield Row(path, number, error="ragged_row", detail=f"{len(cells)} cells, header has {len(header)}")
    else:
      yield Row(path, number, dict(zip(header, cells)))


def _size(value: Any) -> int:
  if isinstance(value, str):
    return len(value.encode("utf-8", "surrogatepass"))
  if isinstance(value, bytes):
    return len(value)
  if isinstance(value, dict):
    return sum(_size(v) for v in value.values())
  if isinstance(value, list):
    return sum(_size(v) for v in value)
  return 8


def _parquet_rows(path: str, batch_rows: int = 4096) -> Iterator[Row]:
  import pyarrow.parquet as pq
  number = 0
  with epath.Path(path).open("rb") as f:
    for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
      for value in batch.to_pylist():
        number += 1
        size = _size(value)
        if size > MAX_RECORD_BYTES:
          yield Row(path, number, error="oversized", detail=f"{size} bytes > {MAX_RECORD_BYTES}")
        else:
          yield Row(path, number, value)
