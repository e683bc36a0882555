"""Builds on Apache Beam (data_pipelines.beam_build): DirectRunner with 2 worker processes writes the
records of the one-process build, in the same order, and reports exactly its counts and locations: for the
three files of the CLI test (a span each) and for a JSONL file cut into many small spans, whose damaged
lines then spread over both workers.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import beam_build, builders, readers, records
from test_data_builders import compression, damaged_inputs, read_all, texts, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"


def without_path(report):
  return {k: v for k, v in report.items() if k not in ("path", "splits")}  # what metadata.json holds


def test_spans_give_every_row_with_its_line_number(tmp_path):
  rng = random.Random(0)
  lines = [rng.choice(["", "  ", '{"q": "%s"}' % ("é" * rng.randint(0, 30)), "{bad"]) for _ in range(400)]
  for ending, trailing in [("\n", True), ("\r\n", True), ("\n", False)]:
    path = tmp_path / f"f{len(ending)}{trailing}.jsonl"
    path.write_bytes((ending.join(lines) + (ending if trailing else "")).encode())
    whole = list(readers.read_rows(str(path)))
    for span_bytes in [1, 2, 5, 64, 1000, 1 << 20]:
      rows, first = [], 1
      for span in readers.spans(str(path), span_bytes):
        rows += readers.read_rows(str(path), span=readers.Span(span.start, span.end, first))
        first += readers.lines_in(str(path), span)
      assert rows == whole, span_bytes
      assert first - 1 == len(lines)


def test_two_workers_write_the_one_process_records_and_report(tmp_path):
  """Stage 1 (JSONL, TSV and Parquet, every stage-1 damage kind) through the CLI with 2 workers."""
  files, good, _, _ = damaged_inputs(tmp_path)
  single = builders.build("custom", str(tmp_path / "one"), files)
  cli = subprocess.run([sys.executable, "-m", "data_pipelines.build", "--source", "custom", "--files", *files,
                        "--data-dir", str(tmp_path / "beam"), "--beam-runner", "DirectRunner",
                        "--beam-options", TWO_WORKERS], capture_output=True, text=True, cwd=REPO, timeout=240)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert f"valid records written: {len(good)}" in cli.stdout
  source, got = read_all(tmp_path / "beam", "custom")
  assert got == read_all(tmp_path / "one", "custom")[1]  # the same records in the same order
  assert without_path(source.build_report) == without_path(single)
  assert source.build_report["skipped_total"] == 19  # damaged_inputs: 12 + 4 + 3


@pytest.mark.timeout(420)
def test_stage2_with_token_ids_in_many_spans(tmp_path, monkeypatch):
  """Stage 2 with every stage-2 damage kind, token ids stored, JSONL cut into spans of 200 bytes. The
  tokenizer folder is gone once the pipeline is made: a cluster's workers have no copy of it, the
  tokenizer travels inside the pickled DoFn."""
  from conftest import realdata_path
  ok = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
  damaged = [{**ok, "negatives": "n1"}, {**ok, "negatives": None}, {**ok, "negatives": ["n1", 3]},
             {**ok, "negatives": ["n1", " "]}, {**ok, "positive_score": "high"}, {**ok, "negative_scores": [0.1]},
             {"query": "q", "negatives": []}, {**ok, "task": 5}]
  good = [{"query": q, "positive": p, "negatives": texts(i % 4, 30 + i), "task": "retrieve " * (i % 2),
           "positive_score": 0.5 + i, "negative_scores": [0.25 * j for j in range(i % 4)]}
          for i, (q, p) in enumerate(zip(texts(40, 20), texts(40, 21)))]
  rows = good[:]
  for i, bad in enumerate(damaged):
    rows.insert(3 + 5 * i, bad)
  path = write_jsonl(tmp_path / "s2.jsonl", rows)
  tokenizer = realdata_path("me5-small-q4")
  single = builders.build("stage2", str(tmp_path / "one"), [path], tokenizer_dir=tokenizer, max_tokens=16)
  launcher_copy = shutil.copytree(tokenizer, tmp_path / "launcher_tokenizer")
  expand = beam_build.ReadFiles.expand

  def expand_then_remove_tokenizer(self, pbegin):
    shutil.rmtree(launcher_copy)
    return expand(self, pbegin)
  monkeypatch.setattr(beam_build.ReadFiles, "expand", expand_then_remove_tokenizer)
  beam = builders.build("stage2", str(tmp_path / "beam"), [path], tokenizer_dir=str(launcher_copy), max_tokens=16,
                        beam_runner="DirectRunner", beam_options=TWO_WORKERS, span_bytes=200)
  assert not launcher_copy.exists()
  assert len(readers.spans(path, 200)) > 20
  assert beam["tokenizer"].pop("dir") == str(launcher_copy)
  single["tokenizer"].pop("dir")
  assert without_path(beam) == without_path(single)
  assert beam["valid"] == len(good) and set(beam["skipped"]) == {"bad_negatives", "missing_field", "non_string",
                                                                  "empty_text", "bad_score"}
  got = read_all(tmp_path / "beam", "stage2")[1]
  want = read_all(tmp_path / "one", "stage2")[1]
  assert compression(tmp_path / "beam", "stage2") == {"uncompressed"}  # the workers wrote with builders' writer
  assert json.dumps(got, default=np.ndarray.tolist) == json.dumps(want, default=np.ndarray.tolist)
  assert all(len(r["negatives_lengths"]) == len(r["negatives"]) for r in got)


def test_strict_beam_build_names_file_and_line_and_leaves_nothing(tmp_path):
  rows = [{"query": f"q{i}", "passage": f"p{i}"} for i in range(50)]
  rows[37] = {"query": f"q{37}"}
  path = write_jsonl(tmp_path / "one_bad.jsonl", rows)
  with pytest.raises(records.BadRecordError) as single:
    builders.build("custom", str(tmp_path / "one"), [path], strict=True)
  with pytest.raises(records.BadRecordError) as beam:
    builders.build("custom", str(tmp_path / "beam"), [path], strict=True, beam_runner="DirectRunner",
                   beam_options=TWO_WORKERS, span_bytes=64)
  assert str(beam.value) == str(single.value) == f"{path}:38: missing_field: no 'passage' (looked for passage)"
  assert not os.path.exists(builders.dataset_path(str(tmp_path / "beam"), "custom"))


def test_beam_flags_refused_before_work(tmp_path):
  with pytest.raises(readers.InputError, match="Bible source builds in one process"):
    builders.build("bible/demo", str(tmp_path), beam_runner="DirectRunner")
  path = write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "passage": "p"}])
  with pytest.raises(readers.InputError, match="--beam-options '--x=\"unclosed': No closing quotation"):
    builders.build("custom", str(tmp_path), [path], beam_options='--x="unclosed')
  assert not os.path.exists(builders.dataset_path(str(tmp_path), "custom"))
