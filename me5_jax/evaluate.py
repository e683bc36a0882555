"""Evaluate an embedding model: BEIR retrieval, bitext mining P@1, STS correlation.

  python -m me5_jax.evaluate --model DIR --task {retrieval,bitext,sts} --data PATH \
      [--query-prefix STR] [--passage-prefix STR] [--instruction STR | --instruction-task NAME] \
      [--pivot COLUMN] [--output metrics.json] [--approximate-search]

Prints the metrics as one JSON object, the last line on stdout; progress and data reports go to stderr.
The trainer calls `evaluate_retrieval` / `evaluate_bitext` / `evaluate_sts` on an `Embedder` in-process;
the CLI only parses flags, loads data (so bad data fails before the model loads) and prints.

Data files are read line by line and never stop on a bad row: each bad row is skipped, counted per file and
reason, and reported on stderr with the file:line of the first one; the metrics JSON says how many rows
were used ("num_*") and skipped ("skipped": {"<file>: <reason>": count}). Rows are read and counted by the
build's own code (`data_pipelines.readers`, `records.BuildReport`), so the reasons are `records.REASONS`'
names. What makes a whole file unusable (missing file, bad header, unknown pivot, no usable rows) raises
`readers.InputError`, a one-line message naming the file.
TSV files are split on tab only: no quoting (Bible verses contain quote characters).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from data_pipelines import readers, records
from data_pipelines.readers import InputError
from me5_jax import cli, compile_cache, distributed, instructions, metrics, search
from me5_jax.tokenize import PASSAGE_PREFIX, QUERY_PREFIX

PROGRAM = "me5_jax.evaluate"  # its `<program>: error:` lines (me5_jax.cli)

if TYPE_CHECKING:
  from me5_jax.embedder import Embedder

ID_COLUMNS = ("ref", "id")  # a bitext header column with one of these names (any case) is a row id
TOP_K = 100  # retrieval run depth: Recall@100 needs 100, nDCG@10 and MRR@10 fewer


def _tsv(path: str, skipped: records.BuildReport) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
  """Header names (stripped) and (line number, cells) of the rows with as many cells."""
  readers.check_files([path], fmt="tsv")
  header = [h.strip() for h in readers.columns(path, "tsv")]
  if not header:
    raise InputError(f"{path}: empty file, expected a header row")
  if len(set(header)) != len(header):
    raise InputError(f"{path}:1: duplicate column names in header {header}")
  return header, ((row.line, list(row.value.values())) for row in records.readable_rows(path, skipped, "tsv"))


def _float(text: str) -> float | None:
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def _report(skipped: records.BuildReport) -> None:
  for line in skipped.first_bad():
    print(line, file=sys.stderr)


def _finish(result: dict, skipped: records.BuildReport) -> dict:
  result["skipped"] = skipped.skipped_by_file()
  return result


# ---------------------------------------------------------------------------------------------------
# Retrieval (BEIR folder)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetrievalData:
  doc_ids: list[str]     # sorted, so index order is the tie-break order
  passages: list[str]
  query_ids: list[str]   # queries with ≥1 relevant doc, sorted
  queries: list[str]
  qrels: dict[str, dict[str, float]]
  skipped: records.BuildReport


def _qrels_path(data_dir: str) -> str:
  for name in (os.path.join("qrels", "test.tsv"), "qrels.tsv"):
    if os.path.isfile(os.path.join(data_dir, name)):
      return os.path.join(data_dir, name)
  raise InputError(f"{data_dir}: no qrels/test.tsv or qrels.tsv")


def _jsonl(path: str, skipped: records.BuildReport, fields: Sequence[str]) -> dict[str, dict]:
  """`_id` → record for lines that parse and have a non-empty string `_id`, a `text` and string `fields`."""
  by_id: dict[str, dict] = {}
  for row in records.readable_rows(path, skipped, "jsonl"):
    rec, why = row.value, None
    if not isinstance(rec, dict):
      why = ("not_an_object", type(rec).__name__)
    elif not isinstance(rec.get("_id"), (str, int)) or rec["_id"] == "":
      why = ("missing_field", "_id")
    elif "text" not in rec:
      why = ("missing_field", "text")
    elif any(not isinstance(rec.get(f, ""), str) for f in fields):
      why = ("non_string", next(f for f in fields if not isinstance(rec.get(f, ""), str)))
    elif str(rec["_id"]) in by_id:
      why = ("duplicate_id", f"_id {rec['_id']!r}")
    if why:
      skipped.bad(path, row.line, *why)
    else:
      by_id[str(rec["_id"])] = rec
      skipped.ok(path)
  return by_id


def load_retrieval(data_dir: str) -> RetrievalData:
  """Reads a BEIR folder; keeps the queries that have a relevant (grade > 0) doc in the qrels."""
  readers.check_files([os.path.join(data_dir, name) for name in ("corpus.jsonl", "queries.jsonl")], fmt="jsonl")
  return load_retrieval_files(os.path.join(data_dir, "corpus.jsonl"), os.path.join(data_dir, "queries.jsonl"),
                              _qrels_path(data_dir))


def load_retrieval_files(corpus_path: str, queries_path: str, qrels_path: str) -> RetrievalData:
  """`load_retrieval` on files named one by one (mining takes them from separate flags)."""
  readers.check_files([corpus_path, queries_path], fmt="jsonl")
  readers.check_files([qrels_path], fmt="tsv")
  skipped = records.BuildReport()
  corpus = _jsonl(corpus_path, skipped, ("title", "text"))
  queries = _jsonl(queries_path, skipped, ("text",))
  header, rows = _tsv(qrels_path, skipped)
  if [h.strip() for h in header] != ["query-id", "corpus-id", "score"]:
    raise InputError(f"{qrels_path}:1: expected header 'query-id<TAB>corpus-id<TAB>score', got {header}")
  qrels: dict[str, dict[str, float]] = {}
  for lineno, (qid, did, grade) in rows:
    score = _float(grade)
    if score is None:
      skipped.bad(qrels_path, lineno, "bad_score", f"{grade!r}")
    elif qid not in queries:
      skipped.bad(qrels_path, lineno, "unknown_id", f"query-id {qid!r}")
    elif did not in corpus:
      skipped.bad(qrels_path, lineno, "unknown_id", f"corpus-id {did!r}")
    else:
      qrels.setdefault(qid, {})[did] = score
      skipped.ok(qrels_path)
  _report(skipped)
  if not corpus:
    raise InputError(f"{corpus_path}: no usable documents")
  qids = sorted(q for q, rels in qrels.items() if any(g > 0 for g in rels.values()))
  if not qids:
    raise InputError(f"{qrels_path}: no query with a relevant (score > 0) document")
  doc_ids = sorted(corpus)
  return RetrievalData(
      doc_ids=doc_ids,
      passages=[(corpus[d].get("title", "") + " " + corpus[d]["text"]).strip() for d in doc_ids],
      query_ids=qids, queries=[queries[q]["text"] for q in qids], qrels=qrels, skipped=skipped)


def evaluate_retrieval(embedder: "Embedder", data: str | RetrievalData, query_prefix: str = QUERY_PREFIX,
                       passage_prefix: str = PASSAGE_PREFIX, batch_size: int = 64,
                       max_length: int | None = None, progress: bool = False, approximate: bool = False) -> dict:
  """nDCG@10, Recall@100, MRR@10 of exact cosine search over the whole corpus, on the devices
  (`search.top_k`, or its `approximate` TPU search; metrics and tie rule: metrics.py)."""
  data = load_retrieval(data) if isinstance(data, str) else data
  encode = dict(batch_size=batch_size, max_length=max_length, progress=progress)
  p_NxD = embedder.encode(data.passages, prefix=passage_prefix, **encode)
  q_QxD = embedder.encode(data.queries, prefix=query_prefix, **encode)
  score_QxK, idx_QxK = search.top_k(q_QxD, p_NxD, TOP_K, approximate=approximate)
  run = {q: {data.doc_ids[j]: float(s) for s, j in zip(score_QxK[i], idx_QxK[i])}
         for i, q in enumerate(data.query_ids)}
  result = {"task": "retrieval", **metrics.retrieval_metrics(run, {q: data.qrels[q] for q in data.query_ids}),
            "num_queries": len(data.query_ids), "num_docs": len(data.doc_ids),
            "num_qrels": sum(len(r) for r in data.qrels.values())}
  return _finish(result, data.skipped)


# ---------------------------------------------------------------------------------------------------
# Bitext mining (aligned TSV)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BitextData:
  columns: list[str]           # language columns, in file order
  pivot: str
  texts: dict[str, list[str]]  # column → aligned texts
  skipped: records.BuildReport


def load_bitext(path: str, pivot: str | None = None, rows: Sequence[int] | None = None) -> BitextData:
  """Language columns are all header columns except those named `ref`/`id`; `rows` picks 0-based data
  rows to keep, row n being line n + 2 of the file. A row with an empty cell is skipped: an empty text
  has no translation to find."""
  skipped = records.BuildReport()
  header, tsv_rows = _tsv(path, skipped)
  lang_cols = [i for i, h in enumerate(header) if h.strip().lower() not in ID_COLUMNS]
  columns = [header[i] for i in lang_cols]
  if len(columns) < 2:
    raise InputError(f"{path}:1: need ≥2 language columns, header is {header}")
  pivot = columns[0] if pivot is None else pivot
  if pivot not in columns:
    raise InputError(f"{path}:1: pivot column {pivot!r} not in {columns}")
  keep = None if rows is None else set(rows)
  texts: dict[str, list[str]] = {c: [] for c in columns}
  for lineno, fields in tsv_rows:
    if keep is not None and lineno - 2 not in keep:
      continue
    empty = [header[i] for i in lang_cols if not fields[i].strip()]
    if empty:
      skipped.bad(path, lineno, "empty_text", f"column {empty[0]}")
      continue
    for c, i in zip(columns, lang_cols):
      texts[c].append(fields[i])
    skipped.ok(path)
  _report(skipped)
  if not texts[pivot]:
    raise InputError(f"{path}: no usable rows")
  return BitextData(columns, pivot, texts, skipped)


def evaluate_bitext(embedder: "Embedder", data: str | BitextData, pivot: str | None = None,
                    prefix: str | None = None, rows: Sequence[int] | None = None, batch_size: int = 64,
                    max_length: int | None = None, progress: bool = False) -> dict:
  """P@1 of every column against the pivot, both directions; `pivot`/`rows` apply when `data` is a path.

  All columns go through one `encode` call so length-sorted batching spans languages.
  """
  data = load_bitext(data, pivot, rows) if isinstance(data, str) else data
  n = len(data.texts[data.pivot])
  emb = embedder.encode([t for c in data.columns for t in data.texts[c]], prefix=prefix,
                        batch_size=batch_size, max_length=max_length, progress=progress)
  emb_by_col = {c: emb[i * n:(i + 1) * n] for i, c in enumerate(data.columns)}
  pivot_NxD = emb_by_col[data.pivot]
  per_col = {c: {"to_pivot": search.p_at_1(emb_by_col[c], pivot_NxD),
                 "from_pivot": search.p_at_1(pivot_NxD, emb_by_col[c])}
             for c in data.columns if c != data.pivot}
  to_pivot = float(np.mean([v["to_pivot"] for v in per_col.values()]))
  from_pivot = float(np.mean([v["from_pivot"] for v in per_col.values()]))
  result = {"task": "bitext", "pivot": data.pivot, "p@1": per_col,
            "mean_p@1_to_pivot": to_pivot, "mean_p@1_from_pivot": from_pivot,
            "mean_p@1": (to_pivot + from_pivot) / 2, "num_rows": n}
  return _finish(result, data.skipped)


# ---------------------------------------------------------------------------------------------------
# STS (sentence1, sentence2, score TSV)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StsData:
  sentence1: list[str]
  sentence2: list[str]
  scores: list[float]
  skipped: records.BuildReport


def load_sts(path: str) -> StsData:
  """Columns found by header name (`sentence1`, `sentence2`, `score`); other columns are ignored."""
  skipped = records.BuildReport()
  header, tsv_rows = _tsv(path, skipped)
  missing = [c for c in ("sentence1", "sentence2", "score") if c not in header]
  if missing:
    raise InputError(f"{path}:1: header lacks {missing}, got {header}")
  i1, i2, iscore = header.index("sentence1"), header.index("sentence2"), header.index("score")
  data = StsData([], [], [], skipped)
  for lineno, fields in tsv_rows:
    score = _float(fields[iscore])
    if score is None:
      skipped.bad(path, lineno, "bad_score", f"{fields[iscore]!r}")
      continue
    data.sentence1.append(fields[i1])
    data.sentence2.append(fields[i2])
    data.scores.append(score)
    skipped.ok(path)
  _report(skipped)
  if len(data.scores) < 2:
    raise InputError(f"{path}: fewer than 2 usable rows")
  return data


def evaluate_sts(embedder: "Embedder", data: str | StsData, prefix: str | None = None,
                 batch_size: int = 64, max_length: int | None = None, progress: bool = False) -> dict:
  """Spearman and Pearson correlation of cosine(sentence1, sentence2) with the gold score."""
  data = load_sts(data) if isinstance(data, str) else data
  n = len(data.scores)
  emb = embedder.encode(data.sentence1 + data.sentence2, prefix=prefix, batch_size=batch_size,
                        max_length=max_length, progress=progress)
  cos_N = np.sum(emb[:n] * emb[n:], axis=1)
  gold_N = np.array(data.scores)
  result = {"task": "sts", "spearman": metrics.spearman(cos_N, gold_N),
            "pearson": metrics.pearson(cos_N, gold_N), "num_pairs": n}
  return _finish(result, data.skipped)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

_TASK_TYPES = {"retrieval": "Retrieval", "bitext": "BitextMining", "sts": "STS"}  # MTEB names


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--model", required=True, help="HF model folder (config.json, weights, tokenizer)")
  ap.add_argument("--task", required=True, choices=("retrieval", "bitext", "sts"))
  ap.add_argument("--data", required=True, help="BEIR folder (retrieval) or TSV file (bitext, sts)")
  ap.add_argument("--query-prefix", default=None,
                  help=f"retrieval queries (default {QUERY_PREFIX!r}); every text for bitext/sts "
                       "(default none); '' for none")
  ap.add_argument("--passage-prefix", default=None, help=f"retrieval passages (default {PASSAGE_PREFIX!r})")
  ap.add_argument("--pivot", default=None, help="bitext pivot column (default: first language column)")
  ap.add_argument("--output", default=None, help="also write the metrics JSON here")
  ap.add_argument("--approximate-search", action="store_true",
                  help="retrieval: lax.approx_max_k (fast on TPU, recall target 0.95; exact elsewhere) instead of exact top-k")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
  instruct = ap.add_mutually_exclusive_group()
  instruct.add_argument("--instruction", default=None, help="instruct models: queries (every text for "
                        "bitext/sts) become 'Instruct: STR\\nQuery: {text}', passages get no prefix")
  instruct.add_argument("--instruction-task", default=None, metavar="NAME",
                        help="--instruction from me5_jax.instructions' table for MTEB task NAME (NQ, SciFact, ...)")
  args = ap.parse_args(argv)
  if args.instruction is not None or args.instruction_task is not None:
    if args.query_prefix is not None or args.passage_prefix is not None:
      ap.error("--instruction/--instruction-task set the prefixes: drop --query-prefix/--passage-prefix")
    task_type, instruction = _TASK_TYPES[args.task], args.instruction
    if instruction is None:
      try:
        instruction = instructions.instruction_for(args.instruction_task, task_type, strict=True)
      except ValueError as e:
        ap.error(str(e))
    args.query_prefix, args.passage_prefix = instructions.prefixes(task_type, args.instruction_task or "",
                                                                   instruction)
  return args


def _prefix(value: str | None, default: str) -> str:
  return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  distributed.initialize()
  compile_cache.enable()
  try:
    if not os.path.isdir(args.model):
      raise InputError(f"{args.model}: no such model folder")
    if args.task == "retrieval":
      data = load_retrieval(args.data)
    elif args.task == "bitext":
      data = load_bitext(args.data, args.pivot)
    else:
      data = load_sts(args.data)
  except InputError as e:
    return cli.error(PROGRAM, e)
  from me5_jax.embedder import Embedder  # after the data checks: bad input fails in well under a second
  try:
    embedder = Embedder.from_pretrained(args.model, max_length=args.max_length)
  except (FileNotFoundError, ValueError) as e:  # the loaders name the missing file or tensor, or the length
    return cli.error(PROGRAM, e)
  encode = dict(batch_size=args.batch_size, max_length=args.max_length, progress=True)
  if args.task == "retrieval":
    result = evaluate_retrieval(embedder, data, _prefix(args.query_prefix, QUERY_PREFIX),
                                _prefix(args.passage_prefix, PASSAGE_PREFIX), approximate=args.approximate_search,
                                **encode)
  elif args.task == "bitext":
    result = evaluate_bitext(embedder, data, prefix=args.query_prefix, **encode)
  else:
    result = evaluate_sts(embedder, data, prefix=args.query_prefix, **encode)
  if not embedder.is_writer:
    return 0
  used = {k: v for k, v in result.items() if k.startswith("num_")}
  print(f"used {used}, skipped {result['skipped'] or 'nothing'}", file=sys.stderr)
  text = json.dumps({"model": args.model, "data": args.data, **result})
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
