"""TFDS builders on real files: JSONL, TSV and Parquet written here, built into array_record datasets and
read back (with TensorFlow made uninstalled for the read side); damaged inputs, strict mode and the CLI;
the Bible source from the real bible.db checked against bible_pd.tsv (made by the independent
../shared/realdata/tools/extract_bible.py).
"""
import collections
import glob
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import Source, bible, builders, open_source, readers, records
from data_pipelines.source import dataset_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Texts that stress encoding and escaping: several scripts, emoji, quotes, backslashes, NUL-free controls.
PIECES = ["Grüße aus Köln", "Москва — столица", "北京是中国的首都", "القاهرة عاصمة", "東京タワー", "🙂👍🏽",
          'a "quoted" word', "back\\slash", "naïve café", "ελληνικά", "हिन्दी पाठ", "  lead and trail  "]


def texts(n, seed, newlines=True):
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = rng.sample(PIECES, 3) + [f"#{seed}-{i}"]
    if newlines and i % 7 == 0:
      words.append("second\nline")  # JSON and Parquet carry newlines; TSV cannot
    out.append(" ".join(words))
  return out


def write_jsonl(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b"\n")
  return str(path)


def write_tsv(path, header, rows):
  with open(path, "wb") as f:
    for row in [header] + rows:
      f.write(row if isinstance(row, bytes) else "\t".join(row).encode() + b"\n")
  return str(path)


def read_all(data_dir, name, split="train"):
  source = open_source(str(data_dir), name, split)
  return source, source.__getitems__(list(range(len(source))))


def compression(data_dir, name) -> set[str]:
  """The compression option of each array_record shard of a built dataset (zstd:3 is TFDS's own)."""
  from array_record.python import array_record_module
  shards = glob.glob(os.path.join(dataset_path(str(data_dir), name), "*.array_record-*"))
  assert shards
  options = [array_record_module.ArrayRecordReader(path).writer_options_string().split(",") for path in shards]
  return {o for opts in options for o in opts if o.split(":")[0] in ("zstd", "brotli", "snappy", "uncompressed")}


def key(record):
  return json.dumps(record, sort_keys=True, ensure_ascii=False)


def same_records(got, want):
  assert len(got) == len(want)
  assert collections.Counter(map(key, got)) == collections.Counter(map(key, want))


# --- stage 1: every input format and each source's field mapping ------------------------------------------

def test_wikipedia_from_jsonl_tsv_and_parquet(tmp_path):
  q, p = texts(40, 1), texts(40, 2)
  qt, pt = texts(30, 3, newlines=False), texts(30, 4, newlines=False)
  files = [
      write_jsonl(tmp_path / "a.jsonl", [{"section_title": a, "text": b, "url": "x"} for a, b in zip(q, p)]),
      write_tsv(tmp_path / "b.tsv", ["id", "title", "text"], [[str(i), a, b] for i, (a, b) in enumerate(zip(qt, pt))]),
  ]
  pq.write_table(pa.table({"title": q[:25], "text": p[:25], "lang": ["de"] * 25}), tmp_path / "c.parquet")
  files.append(str(tmp_path / "c.parquet"))
  report = builders.build("wikipedia", str(tmp_path / "data"), files, lang="xx")
  assert compression(tmp_path / "data", "wikipedia") == {"zstd:3"}  # text only: TFDS's own writer
  want = ([{"query": a, "passage": b, "lang": "xx", "source": "wikipedia"} for a, b in zip(q, p)]
          + [{"query": a, "passage": b, "lang": "xx", "source": "wikipedia"} for a, b in zip(qt, pt)]
          + [{"query": a, "passage": b, "lang": "de", "source": "wikipedia"} for a, b in zip(q[:25], p[:25])])
  assert report["valid"] == 95 and report["skipped_total"] == 0 and report["splits"] == {"train": 95}
  source, got = read_all(tmp_path / "data", "wikipedia")
  same_records(got, want)
  assert source[3] == got[3] and source.build_report["valid"] == 95
  assert [r["query"] for r in got[:40]] != q  # TFDS shuffles when writing: order is not file order


@pytest.mark.parametrize("name,raw,want", [
    ("nllb", {"source": "Hallo Welt", "target": "Hello world", "source_lang": "de", "target_lang": "en"},
     {"query": "Hallo Welt", "passage": "Hello world", "lang": "de-en", "source": "nllb"}),
    ("reddit", {"comment": "Any tips for Lisbon?", "response": "Take tram 28.", "score": 7},
     {"query": "Any tips for Lisbon?", "passage": "Take tram 28.", "lang": "", "source": "reddit"}),
    ("s2orc", {"title": "Attention", "abstract": "We propose", "lang": "en"},
     {"query": "Attention", "passage": "We propose", "lang": "en", "source": "s2orc"}),
    ("stackexchange", {"question": "How to exit vim?", "answer": ":q!"},
     {"query": "How to exit vim?", "passage": ":q!", "lang": "", "source": "stackexchange"}),
    ("xp3", {"inputs": "Translate: chat", "targets": "cat", "language": "fr"},
     {"query": "Translate: chat", "passage": "cat", "lang": "fr", "source": "xp3"}),
    ("sbert", ["What is E5?", "An embedding model.", "ignored third"],
     {"query": "What is E5?", "passage": "An embedding model.", "lang": "", "source": "sbert"}),
    ("custom", {"query": "q", "passage": "p", "lang": "sw", "source": "my-corpus"},
     {"query": "q", "passage": "p", "lang": "sw", "source": "my-corpus"}),
])
def test_source_field_mappings(tmp_path, name, raw, want):
  builders.build(name, str(tmp_path), [write_jsonl(tmp_path / "in.jsonl", [raw])])
  assert read_all(tmp_path, name)[1] == [want]


def test_custom_source_requires_query_and_passage(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "passage": "p"}, {"query": "q", "text": "p"}])
  report = builders.build("custom", str(tmp_path), [path])
  assert report["valid"] == 1 and report["skipped"] == {"missing_field": 1}


# --- stage 2 ---------------------------------------------------------------------------------------------

def test_stage2_roundtrip_with_and_without_scores(tmp_path):
  rng = np.random.default_rng(0)
  raw, want = [], []
  for i in range(30):
    negs = texts(i % 4, 10 + i)
    rec = {"query": f"q{i} Straße", "positive": f"p{i} 東京", "negatives": negs}
    scores = rng.normal(size=1 + len(negs)).tolist()
    if i % 3 == 0:
      rec.update(positive_score=scores[0], negative_scores=scores[1:], task="Given a question, find the answer")
    if i % 3 == 1:
      rec["instruction"] = "Retrieve similar posts"
    raw.append(rec)
    f32 = lambda x: float(np.float32(x))  # noqa: E731  (scores are stored as float32)
    want.append({"query": rec["query"], "positive": rec["positive"], "negatives": negs,
                 "positive_score": f32(scores[0]) if i % 3 == 0 else math.nan,
                 "negative_scores": [f32(s) for s in scores[1:]] if i % 3 == 0 else [math.nan] * len(negs),
                 "task": rec.get("task", rec.get("instruction", ""))})
  builders.build("stage2", str(tmp_path), [write_jsonl(tmp_path / "s2.jsonl", raw)])
  source, got = read_all(tmp_path, "stage2")
  # NaN != NaN: compare with NaNs spelled out (json writes them as NaN, identically on both sides)
  same_records(got, want)
  # The fast proto decoding equals TFDS's own numpy decoding of the same files.
  import tensorflow_datasets as tfds
  reference = tfds.builder_from_directory(builders.dataset_path(str(tmp_path), "stage2")).as_data_source("train")
  for i in range(len(source)):
    ref = reference[i]
    assert got[i]["negatives"] == [t.decode() for t in ref["negatives"]]
    np.testing.assert_array_equal(np.float32(got[i]["negative_scores"]), ref["negative_scores"])
    np.testing.assert_array_equal(np.float32(got[i]["positive_score"]), ref["positive_score"])
    assert (got[i]["query"], got[i]["task"]) == (ref["query"].decode(), ref["task"].decode())
  # Across shards: one file cut into three (first record, count) shards reads the records they name.
  path = source._paths[0]
  cut = Source("stage2", "train", [(path, 0, 3), (path, 5, 4), (path, 1, 2)], source._fields, {})
  assert len(cut) == 9
  assert list(map(key, cut.__getitems__([8, 0, 4, 7, 2]))) == [key(got[i]) for i in (2, 0, 6, 1, 2)]
  with pytest.raises(IndexError, match="record 9 is out of range"):
    cut[9]
  assert key(source.without(["task", "query"])[3]) == key({k: v for k, v in got[3].items() if k not in ("task", "query")})


def test_stage2_rejects_tsv_before_work(tmp_path):
  path = write_tsv(tmp_path / "s2.tsv", ["query", "positive", "negatives"], [["q", "p", "n"]])
  with pytest.raises(readers.InputError, match="s2.tsv: stage-2 records hold lists"):
    builders.build("stage2", str(tmp_path / "data"), [path])


# --- damaged inputs ---------------------------------------------------------------------------------------

def damaged_inputs(tmp_path):
  """Files with 12 kinds of damage mixed with valid records; returns (files, valid records, expected
  skips as {file: Counter(reason)}, the first bad location)."""
  good = [{"query": q, "passage": p, "lang": "", "source": "custom"} for q, p in zip(texts(20, 5), texts(20, 6))]
  jsonl_lines = [
      json.dumps(good[0]).encode(),
      b'{"query": "half a record", "passage": ',                                   # malformed_json
      json.dumps(good[1]).encode(),
      b"",                                                                          # blank: not a record
      b'["a list", "not an object"]',                                               # not_an_object
      b'{"query": "caf\xe9 latin-1", "passage": "p"}',                              # undecodable (bytes)
      b'{"query": "lone \\ud800 surrogate", "passage": "p"}',                       # undecodable (text)
      json.dumps({"query": "big", "passage": "x" * (1 << 20)}).encode(),            # oversized
      json.dumps({"query": "no passage"}).encode(),                                 # missing_field
      json.dumps({"query": None, "passage": "null query"}).encode(),                # missing_field
      json.dumps({"query": 42, "passage": "p"}).encode(),                           # non_string
      json.dumps({"query": "q", "passage": ["list"]}).encode(),                     # non_string
      json.dumps({"query": "q", "passage": "p", "lang": 7}).encode(),               # non_string (lang)
      json.dumps({"query": " \t\u3000 ", "passage": "p"}).encode(),                 # empty_text
      json.dumps({"query": "q", "passage": ""}).encode(),                           # empty_text
  ] + [json.dumps(g, ensure_ascii=False).encode() for g in good[2:10]]
  jsonl = write_jsonl(tmp_path / "damaged.jsonl", jsonl_lines)
  tsv_rows = [[g["query"].replace("\n", " "), g["passage"].replace("\n", " ")] for g in good[10:16]]
  tsv = write_tsv(tmp_path / "damaged.tsv", ["query", "passage"], [
      tsv_rows[0], ["only one cell"], tsv_rows[1], ["a", "b", "c"], b"bad \xff\xfe bytes\tp\n",
      tsv_rows[2], ["   ", "p"], *tsv_rows[3:]])
  for g in good[10:16]:
    g["query"], g["passage"] = g["query"].replace("\n", " "), g["passage"].replace("\n", " ")
  pq.write_table(pa.table({"query": pa.array([g["query"] for g in good[16:]] + [None, "q", "q"]),
                           "passage": pa.array([g["passage"].encode() for g in good[16:]]
                                               + [b"p", b"\xc3\x28 invalid", b"  "], pa.binary())}),
                 tmp_path / "damaged.parquet")
  parquet = str(tmp_path / "damaged.parquet")
  skips = {jsonl: collections.Counter(malformed_json=1, not_an_object=1, undecodable=2, oversized=1,
                                      missing_field=2, non_string=3, empty_text=2),
           tsv: collections.Counter(ragged_row=2, undecodable=1, empty_text=1),
           parquet: collections.Counter(missing_field=1, undecodable=1, empty_text=1)}
  return [jsonl, tsv, parquet], good, skips, f"{jsonl}:2"


def test_damaged_files_keep_every_valid_record_and_count_every_bad_one(tmp_path):
  files, good, skips, _ = damaged_inputs(tmp_path)
  report = builders.build("custom", str(tmp_path / "data"), files)
  same_records(read_all(tmp_path / "data", "custom")[1], good)
  assert report["valid"] == len(good) == 20
  assert report["skipped"] == dict(sum(skips.values(), collections.Counter()))
  assert len(report["skipped"]) >= 8
  for path, counts in skips.items():
    assert report["by_file"][path]["skipped"] == dict(counts)
  assert report["examples"]["oversized"][0].startswith(f"{files[0]}:8: ")
  assert report["examples"]["ragged_row"] == [f"{files[1]}:3: 1 cells, header has 2",
                                              f"{files[1]}:5: 3 cells, header has 2"]
  # Saved with the dataset, for the training log.
  assert open_source(str(tmp_path / "data"), "custom").build_report["skipped"] == report["skipped"]


def test_damaged_stage2_records(tmp_path):
  ok = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
  lines = [ok, {**ok, "negatives": "n1"}, {**ok, "negatives": None}, {**ok, "negatives": ["n1", 3]},
           {**ok, "negatives": ["n1", " "]}, {**ok, "positive_score": "high"}, {**ok, "positive_score": True},
           {**ok, "negative_scores": [0.1]}, {**ok, "negative_scores": 0.1}, {"query": "q", "negatives": []},
           {**ok, "task": 5}, {**ok, "negatives": [], "negative_scores": []}]
  path = write_jsonl(tmp_path / "s2.jsonl", lines)
  with open(path, "ab") as f:
    f.write(json.dumps({**ok, "positive_score": 1.0}).replace("1.0", "Infinity").encode() + b"\n")
  report = builders.build("stage2", str(tmp_path), [path])
  assert report["valid"] == 2
  assert report["skipped"] == {"bad_negatives": 1, "missing_field": 2, "non_string": 2, "empty_text": 1,
                               "bad_score": 5}


def test_strict_mode_names_file_and_line(tmp_path):
  files, *_, first_bad = damaged_inputs(tmp_path)
  with pytest.raises(records.BadRecordError, match=f"^{first_bad}: malformed_json"):
    builders.build("custom", str(tmp_path / "data"), files, strict=True)
  assert not os.path.exists(builders.dataset_path(str(tmp_path / "data"), "custom"))  # nothing half-built


def test_unusable_inputs_fail_before_any_work(tmp_path):
  good = write_jsonl(tmp_path / "ok.jsonl", [{"query": "q", "passage": "p"}])
  data = str(tmp_path / "data")
  with pytest.raises(readers.InputError, match="missing.jsonl: no such file"):
    builders.build("custom", data, [good, str(tmp_path / "missing.jsonl")])
  with pytest.raises(readers.InputError, match=r"in.csv: unknown input format '.csv'"):
    builders.build("custom", data, [good, write_tsv(tmp_path / "in.csv", ["query"], [])])
  tsv = write_tsv(tmp_path / "cols.tsv", ["question", "body"], [["q", "p"]])
  with pytest.raises(readers.InputError, match="cols.tsv: no column for 'query'.*question, body"):
    builders.build("mc4", data, [good, tsv])
  with pytest.raises(readers.InputError, match="unknown source 'wiki'"):
    builders.build("wiki", data, [good])
  assert not os.path.exists(data)
  builders.build("custom", data, [good])
  with pytest.raises(readers.InputError, match="exists; pass overwrite=True"):
    builders.build("custom", data, [good])
  assert builders.build("custom", data, [good, good], overwrite=True)["splits"] == {"train": 2}


def test_open_source_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no built dataset for source 'mc4'.*data_pipelines.build --source mc4"):
    open_source(str(tmp_path), "mc4")
  with pytest.raises(KeyError, match="unknown source 'mc5'"):
    open_source(str(tmp_path), "mc5")
  builders.build("mc4", str(tmp_path), [write_jsonl(tmp_path / "a.jsonl", [{"title": "t", "text": "x"}])])
  with pytest.raises(KeyError, match="no split 'eval'; it has train"):
    open_source(str(tmp_path), "mc4", "eval")


# --- CLI and the TensorFlow-free read side ----------------------------------------------------------------

def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "data_pipelines.build", *args], capture_output=True, text=True,
                        cwd=REPO, timeout=120)


def test_cli_summary_and_strict_exit(tmp_path):
  files, good, skips, first_bad = damaged_inputs(tmp_path)
  data = str(tmp_path / "data")
  out = run_cli("--source", "custom", "--files", *files, "--data-dir", data, "--strict")
  assert out.returncode == 2 and out.stderr.startswith(f"data_pipelines.build: error: {first_bad}: malformed_json: "), out.stderr
  assert not os.path.exists(os.path.join(data, "me5_pairs", "custom", "1.0.0"))
  out = run_cli("--source", "custom", "--files", *files, "--data-dir", data)
  assert out.returncode == 0, out.stderr
  counts = dict(sum(skips.values(), collections.Counter()))
  assert f"valid records written: {len(good)}" in out.stdout
  assert f"skipped records: {sum(counts.values())}" in out.stdout
  for reason, n in counts.items():
    assert any(line.split()[:2] == [reason, str(n)] for line in out.stdout.splitlines()), (reason, out.stdout)
  out = run_cli("--source", "custom", "--files", str(tmp_path / "nope.jsonl"), "--data-dir", data)
  assert out.returncode == 2 and out.stderr.strip().endswith("nope.jsonl: no such file")


HIDE_TF = r"""
import importlib.machinery, sys

class PathFinderWithoutTF(importlib.machinery.PathFinder):
  # As on the GPU machine, TensorFlow is not installed: the finder does not see it. (A None entry in
  # sys.modules would not do: tfds then believes TF is loaded and fails on it.)
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] == "tensorflow" else super().find_spec(name, path, target)

sys.meta_path = [PathFinderWithoutTF if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
  import tensorflow
  raise SystemExit("tensorflow still importable")
except ImportError:
  pass
import json
from data_pipelines import open_source
source = open_source(sys.argv[1], "stage2")
rows = source.__getitems__(list(range(len(source)))) + [source[0]]
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
print(json.dumps(rows))
"""


def test_read_side_needs_no_tensorflow(tmp_path):
  rec = {"query": "q", "positive": "p", "negatives": ["n"], "positive_score": 0.5, "negative_scores": [0.25]}
  builders.build("stage2", str(tmp_path), [write_jsonl(tmp_path / "s2.jsonl", [rec])])
  out = subprocess.run([sys.executable, "-c", HIDE_TF, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout) == [{**rec, "task": ""}] * 2


# --- the Bible --------------------------------------------------------------------------------------------

def test_bible_pairs_align_with_the_reference_extract(tmp_path, bible_db, bible_tsv):
  """First 600 aligned verses: train/eval pairs equal those built from bible_pd.tsv by hand."""
  report = builders.build("bible", str(tmp_path), db_path=bible_db, max_verses=600)
  with open(bible_tsv, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [dict(zip(header, next(f).rstrip("\n").split("\t"))) for _ in range(600)]
  pairs = bible.PAIR_SETS["pd"]

  def expected(verse_rows):
    return [{"query": r[q], "passage": r[p], "lang": f"{q[:2]}-{p[:2]}", "source": "bible"}
            for r in verse_rows for q, p in pairs]
  held_out = rows[::120]
  assert report["splits"] == {"train": 595 * len(pairs), "eval": 5 * len(pairs)}
  assert report["verses"] == {"train": 595, "eval": 5}
  _, train = read_all(tmp_path, "bible")
  _, evaluation = read_all(tmp_path, "bible", "eval")
  same_records(evaluation, expected(held_out))
  same_records(train, expected([r for i, r in enumerate(rows) if i % 120]))
  langs = {side for r in train for side in r["lang"].split("-")}
  assert len(langs) >= 10 and "en" in langs, langs


def test_bible_held_out_tsv_is_the_projects_evaluation_rows(tmp_path, bible_db, bible_tsv):
  out = tmp_path / "held_out.tsv"
  assert bible.write_bitext_tsv(str(out), bible_db) == 259
  with open(bible_tsv, encoding="utf-8") as f:
    lines = f.readlines()
  assert out.read_text(encoding="utf-8").splitlines(keepends=True) == lines[:1] + lines[1::120]


# --- token ids stored at build time (--tokenizer) -----------------------------------------------------------

@pytest.mark.parametrize("model", ["all-MiniLM-L6-v2", "me5-small-q4"])
def test_stored_ids_are_the_pretokenizers_and_the_report_names_the_tokenizer(tmp_path, model):
  from conftest import realdata_path
  from data_pipelines import pretokenized
  from me5_jax.tokenize import Tokenizer
  tokenizer_dir = realdata_path(model)
  pre = pretokenized.Pretokenizer(Tokenizer.from_dir(tokenizer_dir))
  long = " ".join(texts(40, 99, newlines=False))  # beyond --max-tokens 64
  pairs = [{"query": q, "passage": p} for q, p in zip(texts(20, 1), texts(19, 2) + [long])]
  report = builders.build("custom", str(tmp_path / "s1"), [write_jsonl(tmp_path / "s1.jsonl", pairs)],
                          tokenizer_dir=tokenizer_dir, max_tokens=64)
  assert report["tokenizer"]["fingerprint"] == pretokenized.fingerprint(tokenizer_dir)
  assert report["tokenizer"]["max_tokens"] == 64
  source, got = read_all(tmp_path / "s1", "custom")
  assert source.build_report["tokenizer"] == report["tokenizer"]
  assert compression(tmp_path / "s1", "custom") == {"uncompressed"}  # builders.IDS_ARRAY_RECORD_OPTIONS
  for rec in got:
    assert rec["query_ids"].dtype == np.int32  # stored as bytes, read as an array (builders.IDS)
    assert rec["query_ids"].tolist() == pre.text_ids([rec["query"]], 64)[0]
    assert rec["passage_ids"].tolist() == pre.text_ids([rec["passage"]], 64)[0]
  assert max(len(r["passage_ids"]) for r in got) == 64

  raw = [{"query": f"q{i} Straße", "positive": f"p{i} 東京", "negatives": texts(i % 4, 10 + i)} for i in range(9)]
  builders.build("stage2", str(tmp_path / "s2"), [write_jsonl(tmp_path / "s2.jsonl", raw)],
                 tokenizer_dir=tokenizer_dir, max_tokens=64)
  _, got = read_all(tmp_path / "s2", "stage2")
  assert sum(len(r["negatives"]) for r in got) > 0
  for rec in got:
    assert rec["query_ids"].tolist() == pre.text_ids([rec["query"]], 64)[0]
    assert rec["positive_ids"].tolist() == pre.text_ids([rec["positive"]], 64)[0]
    want = pre.text_ids(rec["negatives"], 64)
    assert rec["negatives_lengths"].tolist() == [len(w) for w in want]
    assert rec["negatives_ids"].tolist() == [i for w in want for i in w]
