"""Raw rows → validated examples in the fixed feature schemas, with every skipped record counted.

Stage-1 example: {"query", "passage", "lang", "source"} (all str).
Stage-2 example: {"query", "positive", "negatives": [str], "positive_score": float,
                  "negative_scores": [float], "task": str}.
A teacher score absent from the input is stored as NaN (`negative_scores` then holds one NaN per
negative, so its length always equals that of `negatives`); scores given in the input must be finite.
`task` is "" when absent. Texts are stored exactly as given (no stripping), so what is read back equals
what was written.

Each mE5 source names the raw columns that feed the features (`PAIR_FIELDS`); the first column present
in a record wins, so a source also accepts the generic names where noted.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Sequence

from data_pipelines import readers

# reason → what it means; the build summary and the saved report use these names.
REASONS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the JSON value is not an object (or, for sbert, a list of texts)",
    "undecodable": "bytes that are not UTF-8, or text with lone surrogates",
    "oversized": f"the record is larger than {readers.MAX_RECORD_BYTES} bytes",
    "ragged_row": "a TSV row with a different number of cells than the header",
    "missing_field": "a required field is absent or null",
    "non_string": "a text field holds a non-string value",
    "empty_text": "a text field is empty or whitespace-only",
    "bad_negatives": "negatives is not a list",
    "bad_score": "a score that is not a finite number, or negative_scores not matching negatives",
    "duplicate_id": "an `_id` seen before in the same file (the first record is kept)",
    "unknown_id": "a qrels row naming a query or document that is not loaded",
}
EXAMPLES_PER_REASON = 5  # locations kept per reason in the report, to find the damage quickly


class BadRecordError(ValueError):
  """Strict mode: the first bad record, as `FILE:LINE: reason: detail`."""


class _Invalid(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class PairFields:
  """Raw columns feeding one stage-1 source's features; for each feature the first column present wins.

  `lang_pair` (source, target) columns make lang "src-tgt" (bitext); `source` columns let a record name
  its own source (custom data); `positional` accepts JSON lists [query, passage, ...] (sbert's files).
  """
  query: tuple[str, ...]
  passage: tuple[str, ...]
  lang: tuple[str, ...] = ("lang", "language")
  lang_pair: tuple[str, str] | None = None
  source: tuple[str, ...] = ()
  positional: bool = False


# The mE5 report's ten stage-1 sources (Table 1) and the (query, passage) each contributes.
PAIR_FIELDS = {
    "wikipedia": PairFields(query=("section_title", "title"), passage=("text", "passage")),
    "mc4": PairFields(query=("title",), passage=("text",)),
    "cc_news": PairFields(query=("title",), passage=("text",)),
    "nllb": PairFields(query=("source", "src"), passage=("target", "tgt"),
                       lang_pair=("source_lang", "target_lang")),
    "reddit": PairFields(query=("comment",), passage=("response",)),
    "s2orc": PairFields(query=("title",), passage=("abstract",)),
    "stackexchange": PairFields(query=("question",), passage=("answer",)),
    "xp3": PairFields(query=("inputs",), passage=("targets",)),
    "sbert": PairFields(query=("query", "anchor"), passage=("passage", "positive"), positional=True),
    "custom": PairFields(query=("query",), passage=("passage",), lang=("lang",), source=("source",)),
}
STAGE2_REQUIRED = (("query", "query"), ("positive", "positive"), ("negatives", "negatives"))


class BuildReport:
  """Counts of valid and skipped records, by reason and by file; in strict mode the first bad one raises.

  Reports of disjoint parts of the same input merge (`merge`) into the report of reading it all in one
  pass: counts add up, and the kept locations (the first per file and reason, the first
  EXAMPLES_PER_REASON per reason) are the earliest ones in (file order, line) order, whichever part saw
  them. That is how a Beam build's workers (data_pipelines.beam_build) report exactly what one process would.
  `files` gives the file order; files not in it rank after, in the order they were first seen.
  """

  def __init__(self, strict: bool = False, files: Sequence[str] = ()):
    self.strict = strict
    self._ranks = {path: rank for rank, path in enumerate(files)}  # file order, for the kept locations
    self.valid = 0
    self.skipped: collections.Counter[str] = collections.Counter()
    self.by_file: dict[str, dict[str, Any]] = {}
    # reason -> [(path, line, "FILE:LINE: detail")], the earliest EXAMPLES_PER_REASON
    self.examples: dict[str, list[tuple[str, int, str]]] = collections.defaultdict(list)

  def _file(self, path: str) -> dict[str, Any]:
    self._ranks.setdefault(path, len(self._ranks))
    return self.by_file.setdefault(path, {"valid": 0, "skipped": collections.Counter(), "first": {}})

  def ok(self, path: str) -> None:
    self.valid += 1
    self._file(path)["valid"] += 1

  def bad(self, path: str, line: int, reason: str, detail: str) -> None:
    where = f"{path}:{line}"
    if self.strict:
      raise BadRecordError(f"{where}: {reason}: {detail}")
    self.skipped[reason] += 1
    counts = self._file(path)
    counts["skipped"][reason] += 1
    if reason not in counts["first"] or line < counts["first"][reason][0]:
      counts["first"][reason] = (line, f"{where}: {reason}: {detail}")
    self._keep_examples(reason, [(path, line, f"{where}: {detail}")])

  def _keep_examples(self, reason: str, examples: list[tuple[str, int, str]]) -> None:
    kept = self.examples[reason]
    kept.extend(examples)
    kept.sort(key=lambda e: (self._ranks[e[0]], e[1]))
    del kept[EXAMPLES_PER_REASON:]

  def merge(self, other: "BuildReport") -> "BuildReport":
    """Adds `other` (a report of another part of the same input) into this one; returns self."""
    self.valid += other.valid
    self.skipped.update(other.skipped)
    for path, theirs in other.by_file.items():
      counts = self._file(path)
      counts["valid"] += theirs["valid"]
      counts["skipped"].update(theirs["skipped"])
      for reason, first in theirs["first"].items():
        if reason not in counts["first"] or first < counts["first"][reason]:
          counts["first"][reason] = first
    for reason, kept in other.examples.items():
      self._keep_examples(reason, list(kept))
    return self

  def _ordered_files(self) -> list[str]:
    return sorted(self.by_file, key=self._ranks.__getitem__)

  def skipped_by_file(self) -> dict[str, int]:
    """{"<file name>: <reason>": count}, as evaluation results report what they left out."""
    return {f"{os.path.basename(p)}: {r}": n for p in self._ordered_files()
            for r, n in self.by_file[p]["skipped"].items()}

  def first_bad(self) -> list[str]:
    """One line per file and reason: the first skipped record (FILE:LINE: reason: detail) and the count."""
    return [f"{first} ({self.by_file[p]['skipped'][reason]} skipped, the first shown)"
            for p in self._ordered_files() for reason, (_, first) in self.by_file[p]["first"].items()]

  def to_json(self) -> dict[str, Any]:
    return {"valid": self.valid, "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
            "by_file": {p: {"valid": self.by_file[p]["valid"], "skipped": dict(self.by_file[p]["skipped"])}
                        for p in self._ordered_files()},
            "examples": {reason: [text for _, _, text in kept] for reason, kept in self.examples.items()}}


def format_report(report: dict[str, Any]) -> str:
  """The human summary printed by the build CLI (and usable in the training log)."""
  lines = [f"valid records written: {report['valid']}",
           f"skipped records: {report['skipped_total']}"]
  for reason, count in sorted(report["skipped"].items(), key=lambda kv: -kv[1]):
    first = report["examples"].get(reason, ["?"])[0]
    lines.append(f"  {reason:<15} {count:>9}   first at {first}")
  for path, counts in report["by_file"].items():
    bad = ", ".join(f"{r} {n}" for r, n in sorted(counts["skipped"].items()))
    lines.append(f"  {path}: {counts['valid']} valid" + (f", skipped {bad}" if bad else ""))
  return "\n".join(lines)


def readable_rows(path: str, report: BuildReport, fmt: str | None = None,
                  span: readers.Span | None = None) -> Iterator[readers.Row]:
  """The rows of `path` (of `span` only, if given) that decode (read as `fmt`, default by extension); the
  damaged ones go to `report`. What the builds and `me5_jax.evaluate` read user files with."""
  for row in readers.read_rows(path, fmt, span):
    if row.error:
      report.bad(path, row.line, row.error, row.detail)
    else:
      yield row


def validated(paths: Sequence[str], parse: Callable[[Any], dict[str, Any]], report: BuildReport,
              ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(unique key "file#:line", example) for every valid record of `paths`; the others go to `report`."""
  for file_index, path in enumerate(paths):
    yield from validated_span(file_index, path, None, parse, report)


def validated_span(file_index: int, path: str, span: readers.Span | None, parse: Callable[[Any], dict[str, Any]],
                   report: BuildReport) -> Iterator[tuple[str, dict[str, Any]]]:
  """`validated` for one file (the `file_index`-th input), or one span of it: the one place the record
  rules are applied, by one process and by each Beam worker alike."""
  for row in readable_rows(path, report, span=span):
    try:
      example = parse(row.value)
    except _Invalid as e:
      report.bad(path, row.line, e.reason, e.detail)
      continue
    report.ok(path)
    yield f"{file_index}:{row.line}", example


def _text(value: Any, name: str, allow_empty: bool = False) -> str:
  if value is None:
    raise _Invalid("missing_field", f"{name!r} is null")
  if isinstance(value, bytes):  # Parquet binary columns
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Invalid("undecodable", f"{name!r}: invalid UTF-8 at byte {e.start}") from None
  if not isinstance(value, str):
    raise _Invalid("non_string", f"{name!r} is {type(value).__name__}, not a string")
  if not value.isascii():
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      raise _Invalid("undecodable", f"{name!r} holds a lone surrogate") from None
  if not allow_empty and not value.strip():
    raise _Invalid("empty_text", f"{name!r} is empty or whitespace-only")
  return value


def _first(record: dict[str, Any], keys: tuple[str, ...], name: str) -> Any:
  for key in keys:
    if key in record:
      return record[key]
  raise _Invalid("missing_field", f"no {name!r} (looked for {', '.join(keys)})")


def _optional_text(record: dict[str, Any], keys: tuple[str, ...], name: str, default: str) -> str:
  present = [k for k in keys if record.get(k) is not None]
  return _text(record[present[0]], name, allow_empty=True) if present else default


def pair_parser(source: str, default_lang: str = "") -> Callable[[Any], dict[str, str]]:
  """Parser of one raw stage-1 record of `source` (a key of PAIR_FIELDS) into the stage-1 schema."""
  fields = PAIR_FIELDS[source]

  def parse(record: Any) -> dict[str, str]:
    if fields.positional and isinstance(record, list):
      if len(record) < 2:
        raise _Invalid("missing_field", f"a list of {len(record)} texts; need [query, passage, ...]")
      record = {fields.query[0]: record[0], fields.passage[0]: record[1]}
    if not isinstance(record, dict):
      raise _Invalid("not_an_object", f"a JSON {type(record).__name__}")
    example = {"query": _text(_first(record, fields.query, "query"), "query"),
               "passage": _text(_first(record, fields.passage, "passage"), "passage"),
               "lang": _optional_text(record, fields.lang, "lang", default_lang),
               "source": _optional_text(record, fields.source, "source", source)}
    if fields.lang_pair and all(record.get(k) is not None for k in fields.lang_pair):
      src, tgt = (_text(record[k], k) for k in fields.lang_pair)
      example["lang"] = f"{src}-{tgt}"
    return example

  return parse


def _score(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _Invalid("bad_score", f"{name!r} is {value!r}, not a finite number")
  return float(value)


def parse_stage2(record: Any) -> dict[str, Any]:
  """Parser of one raw stage-2 record (query, positive, negatives[], optional scores and task)."""
  if not isinstance(record, dict):
    raise _Invalid("not_an_object", f"a JSON {type(record).__name__}")
  negatives = _first(record, ("negatives",), "negatives")
  if negatives is None:
    raise _Invalid("missing_field", "'negatives' is null")
  if not isinstance(negatives, list):
    raise _Invalid("bad_negatives", f"'negatives' is {type(negatives).__name__}, not a list")
  example = {"query": _text(_first(record, ("query",), "query"), "query"),
             "positive": _text(_first(record, ("positive",), "positive"), "positive"),
             "negatives": [_text(n, f"negatives[{i}]") for i, n in enumerate(negatives)],
             "task": _optional_text(record, ("task", "instruction"), "task", "")}
  pos_score = record.get("positive_score")
  example["positive_score"] = math.nan if pos_score is None else _score(pos_score, "positive_score")
  neg_scores = record.get("negative_scores")
  if neg_scores is None:
    example["negative_scores"] = [math.nan] * len(negatives)
  elif not isinstance(neg_scores, list) or len(neg_scores) != len(negatives):
    raise _Invalid("bad_score", f"'negative_scores' must be a list of {len(negatives)} numbers, one per negative")
  else:
    example["negative_scores"] = [_score(s, f"negative_scores[{i}]") for i, s in enumerate(neg_scores)]
  return example
