"""Input-pipeline throughput: tokenized pairs/s per core for read → mix → tokenize → batch.

Sources are Bible translation pairs from bible_pd.tsv under four stage-1 source names (mixed with the
report's weights), held in memory or, with --tfds, written as JSONL, built into TFDS array_record datasets
by data_pipelines.builders and read back through open_source. The peer is a plain loop over HF
`tokenizers` batch encoding (truncate to 128, pad to the longest) of exactly the same prefixed texts.
Tokenization runs on one core (TOKENIZERS_PARALLELISM=false), so pairs per CPU-second is pairs/s per core;
wall-clock numbers are shown too (they suffer on a shared machine). With --pretokenized the datasets are
built with the token ids stored (`build --tokenizer`, implies --tfds) and the pipeline reads those instead of
tokenizing; the peer still tokenizes (it is what the ids replace).

With --read-workers N..., the pipeline is also timed with N worker processes building the batches
(data_pipelines.read_workers); its CPU time is then that of every process, its wall time shows the scaling.

  python benchmarks/input_pipeline.py [--tokenizer DIR] [--tsv bible_pd.tsv] [--tfds | --pretokenized]
                                      [--batch 512] [--pack] [--read-workers 1 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core; must precede importing tokenizers

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_pipelines import pretokenized  # noqa: E402
from data_pipelines.input_pipeline import InputPipeline  # noqa: E402
from data_pipelines.mixture import MixtureConfig, MixtureSampler  # noqa: E402
from data_pipelines.preprocess import PreprocessConfig  # noqa: E402
from data_pipelines.read_workers import ReadWorkers  # noqa: E402
from me5_jax import fetch  # noqa: E402
from me5_jax.tokenize import Tokenizer  # noqa: E402

# stage-1 source name → (query column, passage column) of bible_pd.tsv
SOURCES = {"nllb": ("de:e", "en:4"), "wikipedia": ("fr:l", "en:4"), "reddit": ("es:v", "en:k"),
           "xp3": ("ru:r", "en:4")}


def memory_sources(tsv: str, passage_verses: int) -> dict[str, list[dict]]:
  """Verse i in the query language → verses i..i+passage_verses-1 in English (>1: page-like passages
  longer than the max length, as mC4 / CC News bodies are)."""
  with open(tsv, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    rows = list(reader)
  return {name: [{"query": r[header.index(q)],
                  "passage": " ".join(x[header.index(p)] for x in rows[i:i + passage_verses]),
                  "lang": q.split(":")[0], "source": name} for i, r in enumerate(rows)]
          for name, (q, p) in SOURCES.items()}


def tfds_sources(records: dict[str, list[dict]], data_dir: str, tokenizer_dir: str | None = None) -> dict:
  """Writes each source as JSONL in its raw field names, builds it (with token ids when `tokenizer_dir`),
  opens it (TF only for building)."""
  import tensorflow_datasets as tfds
  from data_pipelines import builders, open_source
  from data_pipelines.records import PAIR_FIELDS
  tfds.disable_progress_bar()
  os.makedirs(data_dir)
  for name, recs in records.items():
    path = os.path.join(data_dir, f"{name}.jsonl")
    fields = PAIR_FIELDS[name]
    with open(path, "w", encoding="utf-8") as f:
      for r in recs:
        f.write(json.dumps({fields.query[0]: r["query"], fields.passage[0]: r["passage"]}) + "\n")
    builders.build(name, data_dir, [path], tokenizer_dir=tokenizer_dir)
  return {name: open_source(data_dir, name) for name in records}


def cpu_seconds(pids=()) -> float:
  """CPU seconds used so far by this process and the processes `pids` (from /proc: user + system)."""
  ticks = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      ticks += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
  return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def timed(fn, batches: int, pids=()) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process and `pids`) for `batches` calls of fn."""
  wall, cpu = time.perf_counter(), cpu_seconds(pids)
  for _ in range(batches):
    fn()
  return time.perf_counter() - wall, cpu_seconds(pids) - cpu


def peer_texts(sources, mixture: MixtureConfig, prep: PreprocessConfig, batches: int):
  """The prefixed texts the pipeline will tokenize, batch by batch, from the same mixture plan."""
  sampler = MixtureSampler({n: len(r) for n, r in sources.items()}, mixture)
  out = []
  for _ in range(batches):
    plan = sampler.next_plan()
    recs = [(sampler.names[s], sources[sampler.names[s]][i]) for s, i in zip(plan.sources, plan.indices)]
    out.append(([prep.query_text(r, n) for n, r in recs],
                [prep.passage_text(r["passage"], n) for n, r in recs]))
  return out


def run(args, passage_verses: int, tmp: str) -> tuple[dict[int, tuple[float, float]], tuple[float, float]]:
  """({read workers: (wall, CPU) seconds per pair} of our pipeline, (wall, CPU) per pair of the peer), each
  the median of args.repeats timings taken in turn (ours with 0, 1, 2... read workers, then the peer, then
  again), so that a slow spell of a shared machine hits every row alike; 0 read workers: built in this process."""
  records = memory_sources(args.tsv, passage_verses)
  mixture = MixtureConfig(global_batch_size=args.batch, seed=0)
  prep = PreprocessConfig(max_query_length=args.max_length, max_passage_length=args.max_length, pack_rows=args.pack)
  sources = records
  if args.tfds:
    sources = tfds_sources(records, os.path.join(tmp, str(passage_verses)),
                           args.tokenizer if args.pretokenized else None)
  fingerprint = pretokenized.fingerprint(args.tokenizer) if args.pretokenized else None
  pipe = InputPipeline(sources, Tokenizer.from_dir(args.tokenizer), mixture, prep, tokenizer_fingerprint=fingerprint)
  assert all(pipe.with_ids.values()) == args.pretokenized
  next(pipe)  # warm-up: first reads, allocations

  def ours(workers: int) -> tuple[float, float]:
    if not workers:
      return timed(lambda: next(pipe), args.batches)
    with ReadWorkers(pipe, workers) as ahead:
      for _ in range(4 * workers):  # warm-up: every worker started (imports) and built batches
        next(ahead)
      return timed(lambda: next(ahead), args.batches, [w.pid for w in ahead._workers])

  peer_batches = min(args.batches, args.peer_batches)
  texts = peer_texts(sources, mixture, prep, peer_batches)  # TFDS order differs from the lists
  hf = tokenizers.Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
  hf.enable_truncation(args.max_length)
  hf.enable_padding(pad_id=hf.token_to_id("<pad>"))
  hf.encode_batch(["warm up"] * 8)

  def peer() -> tuple[float, float]:
    batches = iter(texts)

    def peer_batch():
      queries, passages = next(batches)
      for enc in (hf.encode_batch(queries), hf.encode_batch(passages)):
        np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32)
    return timed(peer_batch, peer_batches)

  paths = [0, *args.read_workers]
  times: dict = {path: [] for path in paths + ["peer"]}
  for _ in range(args.repeats):
    for path in paths:
      wall, cpu = ours(path)
      times[path].append((wall / (args.batch * args.batches), cpu / (args.batch * args.batches)))
    wall, cpu = peer()
    times["peer"].append((wall / (args.batch * peer_batches), cpu / (args.batch * peer_batches)))
  median = lambda xs: tuple(float(np.median(x)) for x in zip(*xs))  # noqa: E731
  return {path: median(times[path]) for path in paths}, median(times["peer"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokenizer", default=None,
                  help="folder with the XLM-R tokenizer.json")
  ap.add_argument("--tsv", default=None, help="bible_pd.tsv (default: from me5_jax.fetch)")
  ap.add_argument("--tfds", action="store_true", help="read TFDS array_record datasets, not lists")
  ap.add_argument("--pretokenized", action="store_true", help="TFDS datasets built with token ids, read as ids")
  ap.add_argument("--batch", type=int, default=512, help="global batch (one host)")
  ap.add_argument("--batches", type=int, default=None,
                  help="batches per timing of our pipeline (default: 100 from stored ids, else 30)")
  ap.add_argument("--peer-batches", type=int, default=30, help="at most this many per timing of the peer")
  ap.add_argument("--repeats", type=int, default=3, help="timings per row, taken in turn; the median is shown")
  ap.add_argument("--max-length", type=int, default=128)
  ap.add_argument("--passage-verses", type=int, nargs="+", default=[1, 10],
                  help="verses per passage, one table row pair each")
  ap.add_argument("--pack", action="store_true", help="the packed layout (pack_sequences) instead of padded rows")
  ap.add_argument("--read-workers", type=int, nargs="*", default=[],
                  help="also time the pipeline with these numbers of read worker processes (CPU time: all processes)")
  args = ap.parse_args()
  args.tfds = args.tfds or args.pretokenized
  args.tokenizer = args.tokenizer or fetch.fetch("me5-small-q4")
  args.tsv = args.tsv or fetch.fetch("bible_pd.tsv")
  for path in (os.path.join(args.tokenizer, "tokenizer.json"), args.tsv):
    if not os.path.exists(path):
      sys.exit(f"{path} is missing: pass another --tokenizer / --tsv")

  args.batches = args.batches or (100 if args.pretokenized else 30)
  pairs = args.batch * args.batches
  print(f"read → mix → tokenize → batch: {pairs} Bible pairs per timing, median of {args.repeats} timings "
        f"taken in turn ({', '.join(SOURCES)} → en), "
        f"max length {args.max_length}, {'packed' if args.pack else 'padded'}, batch {args.batch}, "
        f"sources {'TFDS array_record' + (' with token ids' if args.pretokenized else '') if args.tfds else 'in memory'}, "
        "1 tokenizer thread")
  print("| passages | path | pairs/s per core (CPU time) | pairs/s (wall) | ratio to peer (per core) | wall ratio to 1 worker |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for verses in args.passage_verses:
      ours, peer = run(args, verses, tmp)
      path = "me5_jax InputPipeline" + (" (stored ids)" if args.pretokenized else "")
      rows = [(path + (f", {w} read worker{'s' * (w > 1)}" if w else ""), times, w) for w, times in ours.items()]
      for name, (wall, cpu), workers in rows + [("HF tokenizers encode_batch loop", peer, None)]:
        scaling = f"{ours[1][0] / wall:.2f}" if workers and 1 in ours else ""
        print(f"| {verses} verse{'s' * (verses > 1)} | {name} | {1 / cpu:,.0f} | {1 / wall:,.0f} | "
              f"{peer[1] / cpu:.2f} | {scaling} |", flush=True)


if __name__ == "__main__":
  main()
