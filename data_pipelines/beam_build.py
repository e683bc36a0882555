"""Builds on Apache Beam: many workers read spans of the input files, one process's records and report.

`python -m data_pipelines.build ... --beam-runner DirectRunner --beam-options "--direct_num_workers=2
--direct_running_mode=multi_processing"` builds with local worker processes; the same command with
Dataflow / Flink / Spark options builds on a cluster (TFDS's Beam support writes the shards).

The work is cut into spans (`readers.spans`: about SPAN_BYTES of a JSONL/TSV file each, a whole Parquet
file), so one big file spreads over workers too. A first pass counts each span's lines, so that every row
keeps its FILE:LINE; then each worker validates its spans with `records.validated_span` (the same record
rules as a one-process build, no second copy), adds token ids (`Pretokenizer.add_ids`) and emits
(key, example) under the one-process keys "file#:line". TFDS orders examples by a hash of the key, so the
written dataset is record for record the one-process build's. Each span's `records.BuildReport` goes to a
side output; `BuildReport.merge` combines them into exactly the report one process would have written,
which the builder stores in metadata.json (`REPORT_FILE`, a file in the dataset's folder while it builds).

On a cluster (Dataflow, Spark, Flink) the workers read what the launching machine names: `--files` and
`--data-dir` on storage they reach (gs://..., through etils.epath), and me5_jax installed in their image
(`--sdk_container_image`, or `--extra_package` with this package's wheel). The tokenizer needs no path
there: it travels inside the pickled `_ReadSpan` (XLM-R's: ~9 MB of Dataflow's job graph; past the
service's limit, `--experiments=upload_graph` stages the graph instead). Only local runs are tested here.

In strict mode the first bad record a worker meets fails the pipeline; `strict_error` finds its
`FILE:LINE: reason: detail` in the runner's error, which carries the worker's traceback as text.
"""
from __future__ import annotations

import json
import re
import shlex
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from data_pipelines import pretokenized, readers, records

SPAN_BYTES = 64 << 20  # a worker's unit of input: large enough to amortise a task, small enough to spread
REPORT_FILE = "build_report.json"
_REPORT_TAG = "report"


def pipeline_options(options: str) -> PipelineOptions:
  """`--beam-options "--flag=value ..."` as Beam's PipelineOptions; workers log warnings and errors only
  (each would announce its start, channels and exit) unless the flags set a level."""
  flags = shlex.split(options)
  if not any(f.startswith("--default_sdk_harness_log_level") for f in flags):
    flags.append("--default_sdk_harness_log_level=WARNING")
  return PipelineOptions(flags)


def strict_error(error: BaseException) -> records.BadRecordError | None:
  """The strict-mode BadRecordError a worker raised, recovered from the runner's error (None if another)."""
  for message in (str(error), repr(error)):
    match = re.search(r"BadRecordError: (.+?:\d+: [a-z_]+: [^\n\\]*)", message)
    if match:
      return records.BadRecordError(match.group(1).rstrip("'\""))
  return None


def _line_count(work: tuple[int, readers.Span], files: Sequence[str]) -> tuple[tuple[int, int], int]:
  file_index, span = work
  return (file_index, span.start), readers.lines_in(files[file_index], span)


def _first_lines(counts: list[tuple[tuple[int, int], int]]) -> dict[tuple[int, int], int]:
  """(file index, span start) → the line number its first line has, from each span's line count."""
  first, numbers = {}, {}
  for (file_index, start), lines in sorted(counts):
    number = numbers.get(file_index, 1)
    first[(file_index, start)] = number
    numbers[file_index] = number + lines
  return first


class _ReadSpan(beam.DoFn):
  """A span of one input file → its valid (key, example)s, and its BuildReport on the side output."""

  def __init__(self, parse: Callable[[Any], dict[str, Any]], files: Sequence[str], strict: bool,
               pretokenizer: pretokenized.Pretokenizer | None, max_tokens: int):
    """pretokenizer travels inside the pickled DoFn (HF tokenizers pickle as their JSON): a Dataflow or
    Spark worker has no copy of the launching machine's tokenizer folder."""
    self.parse, self.files, self.strict = parse, list(files), strict
    self.pretokenizer, self.max_tokens = pretokenizer, max_tokens

  def process(self, item: tuple[int, readers.Span], first_lines: dict[tuple[int, int], int]):
    file_index, span = item
    path = self.files[file_index]
    span = readers.Span(span.start, span.end, first_lines[(file_index, span.start)])
    report = records.BuildReport(self.strict, self.files)
    examples = records.validated_span(file_index, path, span, self.parse, report)
    if self.pretokenizer is not None:
      examples = self.pretokenizer.add_ids(examples, self.max_tokens)
    yield from examples
    yield beam.pvalue.TaggedOutput(_REPORT_TAG, report)


class _MergeReports(beam.CombineFn):
  def __init__(self, files: Sequence[str]):
    self.files = list(files)

  def create_accumulator(self) -> records.BuildReport:
    return records.BuildReport(files=self.files)

  def add_input(self, merged: records.BuildReport, report: records.BuildReport) -> records.BuildReport:
    return merged.merge(report)

  def merge_accumulators(self, reports) -> records.BuildReport:
    merged = self.create_accumulator()
    for report in reports:
      merged.merge(report)
    return merged

  def extract_output(self, merged: records.BuildReport) -> dict[str, Any]:
    return merged.to_json()


def _write_report(report: dict[str, Any], path: str) -> None:
  epath.Path(path).write_text(json.dumps(report))


class ReadFiles(beam.PTransform):
  """files → PCollection of (key, example): valid records parsed by `parse`, with token ids when a
  `pretokenizer` is given; the merged report (BuildReport.to_json) is written to `report_path`."""

  def __init__(self, files: Sequence[str], parse: Callable[[Any], dict[str, Any]], *, strict: bool,
               report_path: str, pretokenizer: pretokenized.Pretokenizer | None = None,
               max_tokens: int = pretokenized.DEFAULT_MAX_TOKENS, span_bytes: int = SPAN_BYTES):
    super().__init__()
    self.files, self.parse, self.strict = list(files), parse, strict
    self.report_path, self.pretokenizer, self.max_tokens = report_path, pretokenizer, max_tokens
    self.span_bytes = span_bytes

  def expand(self, pbegin):
    work = [(i, span) for i, path in enumerate(self.files) for span in readers.spans(path, self.span_bytes)]
    spans = (pbegin | "Spans" >> beam.Create(work)
             | "Spread" >> beam.Reshuffle())  # hand spans to all workers, not the one that created them
    first_lines = (spans
                   | "CountLines" >> beam.Map(_line_count, self.files)
                   | "AllCounts" >> beam.combiners.ToList()
                   | "FirstLines" >> beam.Map(_first_lines))
    read = spans | "Read" >> beam.ParDo(
        _ReadSpan(self.parse, self.files, self.strict, self.pretokenizer, self.max_tokens),
        first_lines=beam.pvalue.AsSingleton(first_lines)).with_outputs(_REPORT_TAG, main="examples")
    _ = (read[_REPORT_TAG]
         | "MergeReports" >> beam.CombineGlobally(_MergeReports(self.files))
         | "WriteReport" >> beam.Map(_write_report, self.report_path))
    return read.examples

