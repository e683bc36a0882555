"""Hard-negative mining: BEIR queries, corpus and qrels → stage-2 JSONL for `data_pipelines.build`.

  python -m me5_jax.mine --model M --queries Q --corpus C --qrels R --out stage2.jsonl [--top-k 100] \
      [--skip-top N] [--max-score-ratio X] [--num-negatives K] [--teacher CE_DIR] [--task STR] \
      [--query-prefix STR] [--passage-prefix STR] [--batch-size N] [--max-length L] [--approximate-search]

Negatives of a query (each of its positives gets the same list), in this order:
1. candidates: its top-k documents by exact cosine search over the whole corpus, on the devices
   (`search.top_k`: score descending, ties by document id);
2. its known positives (qrels grade > 0) are dropped; documents judged non-relevant (grade <= 0) stay, they
   are the surest hard negatives. So is every candidate whose text equals a positive's, exactly or after
   whitespace normalisation (real corpora store some passages twice under different ids: such a "negative"
   is the positive itself), and every candidate whose text equals a better-ranked candidate's (kept once);
3. --skip-top N drops the N best-ranked candidates left after step 2 (so N counts non-positive documents,
   however many positives the query has ranked above them);
4. --max-score-ratio X drops candidates scoring above X × s_pos, s_pos being the lowest score among the
   query's positives (its hardest positive, as sentence-transformers' `mine_hard_negatives` uses for its
   margins): a document the model ranks that close to a known positive is often an unlabelled positive,
   and training it away hurts. Written s_pos − (1 − X)·|s_pos| so that a negative s_pos still gets a
   threshold below it. Steps 3 and 4 are independent: a candidate is kept if it passes both;
5. the first --num-negatives survivors in rank order (default: all of them).

Output: one line per (query, positive) pair, queries and positives in id order, texts as loaded (passage =
(title + " " + text).strip(), no prefixes: the input pipeline adds them at training time):
{"query", "positive", "negatives": [...], "task"} plus, with --teacher, "positive_score" and
"negative_scores": the cross-encoder's logits (raw, no sigmoid: the distillation loss takes a softmax over
each group, which probabilities squashed into [0, 1] would flatten). Without a teacher the score fields are
left out and the builder stores NaN (trainable with use_teacher=False). Progress and counts go to stderr;
the last stdout line is a JSON summary. Bad inputs fail as one-line errors naming the file, before the model
loads (the loaders and their reporting are `me5_jax.evaluate`'s).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from me5_jax import cli, compile_cache, distributed, search
from data_pipelines.readers import InputError
from me5_jax.evaluate import RetrievalData, load_retrieval_files
from me5_jax.tokenize import PASSAGE_PREFIX, QUERY_PREFIX

PROGRAM = "me5_jax.mine"  # its `<program>: error:` lines (me5_jax.cli)

if TYPE_CHECKING:
  from me5_jax.embedder import Embedder


@dataclasses.dataclass(frozen=True)
class MiningConfig:
  top_k: int = 100
  skip_top: int = 0
  max_score_ratio: float | None = None
  num_negatives: int | None = None  # None: every candidate that survives the filters
  approximate: bool = False  # step 1 with lax.approx_max_k (fast on TPU) instead of exact top-k

  def __post_init__(self):
    if self.top_k < 1:
      raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
    if self.skip_top < 0:
      raise ValueError(f"--skip-top must be >= 0, got {self.skip_top}")
    if self.max_score_ratio is not None and not self.max_score_ratio > 0:
      raise ValueError(f"--max-score-ratio must be > 0, got {self.max_score_ratio}")
    if self.num_negatives is not None and self.num_negatives < 1:
      raise ValueError(f"--num-negatives must be >= 1, got {self.num_negatives}")


def positive_indices(data: RetrievalData) -> list[np.ndarray]:
  """For each of `data.query_ids`, the corpus rows of its positives (grade > 0), in doc-id order."""
  row = {d: i for i, d in enumerate(data.doc_ids)}
  return [np.array(sorted(row[d] for d, g in data.qrels[q].items() if g > 0), np.int64)
          for q in data.query_ids]


def score_threshold(pos_score: float, ratio: float) -> float:
  """ratio × pos_score for pos_score >= 0; for a negative pos_score, as far below it as that is below a
  positive one (a plain product would put the threshold above the positive)."""
  return pos_score - (1.0 - ratio) * abs(pos_score)


def text_key(text: str) -> str:
  """What two passages must share to count as the same text: their words, whitespace normalised."""
  return " ".join(text.split())


def select_negatives(q_QxD: np.ndarray, p_NxD: np.ndarray, positives: Sequence[np.ndarray],
                     passages: Sequence[str], cfg: MiningConfig) -> tuple[list[np.ndarray], collections.Counter]:
  """Corpus rows of each query's negatives, best first (steps 1-5 of the module docstring), and counts of
  candidates per fate: retrieved, known_positive, positive_text (a positive's text under another id),
  repeated_text (a better candidate's text), skip_top, max_score_ratio (beyond skip_top), num_negatives
  (cut by the cap), kept."""
  score_QxK, idx_QxK = search.top_k(q_QxD, p_NxD, cfg.top_k, approximate=cfg.approximate)
  keys: dict[int, str] = {}  # corpus row → text_key, for the rows that come up
  text_of = lambda j: keys.setdefault(j, text_key(passages[j]))  # noqa: E731
  counts = collections.Counter()
  negatives = []
  for i, pos in enumerate(positives):
    pos_rows = set(pos.tolist())
    pos_texts = {text_of(j) for j in pos_rows}
    seen = set(pos_texts)
    fates = []
    for j in idx_QxK[i].tolist():
      text = text_of(j)
      fates.append("known_positive" if j in pos_rows else "positive_text" if text in pos_texts else
                   "repeated_text" if text in seen else "candidate")
      seen.add(text)
    counts.update(f for f in fates if f != "candidate")
    cand_K = np.array([f == "candidate" for f in fates], bool)
    idx, score = idx_QxK[i][cand_K], score_QxK[i][cand_K]
    keep = np.arange(len(idx)) >= cfg.skip_top
    counts.update(retrieved=len(fates), skip_top=int((~keep).sum()))
    if cfg.max_score_ratio is not None:
      pos_score = float(np.min(p_NxD[pos] @ q_QxD[i]))
      below = score <= score_threshold(pos_score, cfg.max_score_ratio)
      counts["max_score_ratio"] += int((keep & ~below).sum())
      keep &= below
    chosen = idx[keep][:cfg.num_negatives]
    counts.update(num_negatives=int(keep.sum()) - len(chosen), kept=len(chosen))
    negatives.append(chosen)
  return negatives, counts


def teacher_scores(teacher_dir: str, pairs: list[tuple[str, str]], batch_size: int = 64,
                   progress: bool = False) -> np.ndarray:
  """Cross-encoder logits for (query, passage) pairs; sentence-transformers (PyTorch) is imported here only."""
  try:
    import torch
    from sentence_transformers import CrossEncoder
  except ImportError as e:
    raise InputError(f"--teacher needs PyTorch and sentence-transformers (pip install 'me5_jax[torch]'): {e}")
  model = CrossEncoder(teacher_dir)
  chunk = max(batch_size * 16, 1)  # predict per chunk, to report progress
  out_P = np.zeros(len(pairs), np.float32)
  start = time.time()
  for c0 in range(0, len(pairs), chunk):
    out_P[c0:c0 + chunk] = model.predict(pairs[c0:c0 + chunk], batch_size=batch_size, show_progress_bar=False,
                                         activation_fn=torch.nn.Identity())
    if progress:
      done = min(c0 + chunk, len(pairs))
      print(f"teacher scored {done}/{len(pairs)} pairs ({done / (time.time() - start):.0f}/s)",
            file=sys.stderr, flush=True)
  return out_P


def stage2_records(data: RetrievalData, positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray],
                   task: str = "", teacher: dict[tuple[int, int], float] | None = None) -> list[dict]:
  """One stage-2 record per (query, positive); `teacher` maps (query index, corpus row) → score."""
  records = []
  for i, (pos, neg) in enumerate(zip(positives, negatives)):
    for j in pos.tolist():
      rec = {"query": data.queries[i], "positive": data.passages[j],
             "negatives": [data.passages[n] for n in neg.tolist()]}
      if teacher is not None:
        rec["positive_score"] = teacher[i, j]
        rec["negative_scores"] = [teacher[i, n] for n in neg.tolist()]
      rec["task"] = task
      records.append(rec)
  return records


def mine(embedder: "Embedder", data: RetrievalData, cfg: MiningConfig, *, teacher_dir: str | None = None,
         task: str = "", query_prefix: str = QUERY_PREFIX, passage_prefix: str = PASSAGE_PREFIX,
         batch_size: int = 64, max_length: int | None = None, progress: bool = False,
         ) -> tuple[list[dict], collections.Counter]:
  """Stage-2 records (see the module docstring) and the candidate counts of `select_negatives`."""
  encode = dict(batch_size=batch_size, max_length=max_length, progress=progress)
  p_NxD = embedder.encode(data.passages, prefix=passage_prefix, **encode)
  q_QxD = embedder.encode(data.queries, prefix=query_prefix, **encode)
  positives = positive_indices(data)
  negatives, counts = select_negatives(q_QxD, p_NxD, positives, data.passages, cfg)
  teacher = None
  if teacher_dir is not None:
    keys = sorted({(i, j) for i, (pos, neg) in enumerate(zip(positives, negatives))
                   for j in (*pos.tolist(), *neg.tolist())})
    scores_P = teacher_scores(teacher_dir, [(data.queries[i], data.passages[j]) for i, j in keys],
                              batch_size, progress)
    teacher = dict(zip(keys, scores_P.tolist()))
  return stage2_records(data, positives, negatives, task, teacher), counts


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--model", required=True, help="HF model folder that retrieves the candidates")
  ap.add_argument("--queries", required=True, help="BEIR queries.jsonl ({_id, text})")
  ap.add_argument("--corpus", required=True, help="BEIR corpus.jsonl ({_id, title, text})")
  ap.add_argument("--qrels", required=True, help="TSV with header query-id, corpus-id, score")
  ap.add_argument("--out", required=True, help="stage-2 JSONL to write")
  ap.add_argument("--top-k", type=int, default=100, help="candidates retrieved per query")
  ap.add_argument("--skip-top", type=int, default=0, help="drop the N best non-positive candidates")
  ap.add_argument("--max-score-ratio", type=float, default=None,
                  help="drop candidates scoring above X × the query's lowest positive score")
  ap.add_argument("--num-negatives", type=int, default=None, help="negatives kept per query (default: all)")
  ap.add_argument("--approximate-search", action="store_true",
                  help="candidates by lax.approx_max_k (fast on TPU, recall target 0.95; exact elsewhere)")
  ap.add_argument("--teacher", default=None, help="cross-encoder folder: fills the teacher scores")
  ap.add_argument("--task", default="", help="the records' task (instruction), default none")
  ap.add_argument("--query-prefix", default=QUERY_PREFIX, help=f"default {QUERY_PREFIX!r}; '' for none")
  ap.add_argument("--passage-prefix", default=PASSAGE_PREFIX, help=f"default {PASSAGE_PREFIX!r}; '' for none")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  distributed.initialize()
  compile_cache.enable()
  from me5_jax import hf_io
  try:
    cfg = MiningConfig(args.top_k, args.skip_top, args.max_score_ratio, args.num_negatives, args.approximate_search)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
      raise ValueError("--batch-size and --max-length must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or os.path.isdir(args.out):
      raise InputError(f"{args.out}: cannot write there (no such folder, or a folder)")
    hf_io.check_model_dir(args.model)
    if args.teacher is not None:
      hf_io.check_model_dir(args.teacher)
    data = load_retrieval_files(args.corpus, args.queries, args.qrels)
  except (InputError, ValueError, FileNotFoundError) as e:
    return cli.error(PROGRAM, e)
  print(f"mining {len(data.query_ids)} queries with positives over {len(data.doc_ids)} documents",
        file=sys.stderr, flush=True)
  from me5_jax.embedder import Embedder
  try:
    embedder = Embedder.from_pretrained(args.model, max_length=args.max_length)
    records, counts = mine(embedder, data, cfg, teacher_dir=args.teacher, task=args.task,
                           query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
                           batch_size=args.batch_size, max_length=args.max_length, progress=True)
  except (InputError, ValueError, FileNotFoundError) as e:  # a missing tensor, --max-length beyond the model's
    # positions, --teacher without PyTorch
    return cli.error(PROGRAM, e)
  if not embedder.is_writer:
    return 0
  tmp = args.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  os.replace(tmp, args.out)  # no half-written file when anything above fails
  num_neg_Q = np.array([len(r["negatives"]) for r in records])
  summary = {"out": args.out, "lines": len(records), "queries": len(data.query_ids), "docs": len(data.doc_ids),
             "candidates": dict(counts), "lines_without_negatives": int((num_neg_Q == 0).sum()),
             "mean_negatives": float(num_neg_Q.mean()), "teacher": args.teacher, "skipped": data.skipped.skipped_by_file()}
  print(f"wrote {len(records)} lines to {args.out}; candidates {dict(counts)}", file=sys.stderr)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
