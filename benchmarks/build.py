"""Build throughput: records/s of `data_pipelines.build` in one process and as a Beam DirectRunner pipeline
with 1 and 2 worker processes, on the same input, and a projection for a billion pairs on N workers.

The input is stage-1 pairs from bible_pd.tsv (verse i in one of 6 languages → English verses i..i+V-1),
written as JSONL files (several, as a real source arrives in shards), with 1 % damaged lines; each build
stores the token ids too (`--tokenizer`, the XLM-R tokenizer of me5-small-q4), as a pod-scale build would.
Wall time includes everything the command does (workers' start, the line-counting pass, TFDS's shuffle
and write); CPU time is split between this process (for Beam: the runner, which also moves data between
stages) and the worker processes. The projection divides 1e9 by N worker vCPUs times the records per
worker CPU-second of the largest run: a cluster adds its own start-up, and its shuffle service replaces
the runner's part.

  python benchmarks/build.py [--records 200000] [--files 4] [--passage-verses 3] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from me5_jax import fetch  # noqa: E402

LANGS = ["de:e", "fr:l", "es:v", "it:d", "pt:a", "ru:r"]


def cpu(who: int) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def write_inputs(tsv: str, out_dir: str, records: int, files: int, passage_verses: int) -> list[str]:
  with open(tsv, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    rows = list(reader)
  english = header.index("en:4")
  langs = [header.index(c) for c in LANGS if c in header]
  rng = random.Random(0)
  paths = [os.path.join(out_dir, f"pairs-{i:03d}.jsonl") for i in range(files)]
  handles = [open(p, "w", encoding="utf-8") for p in paths]
  for n in range(records):
    i = n % len(rows)
    line = json.dumps({"query": rows[i][langs[n % len(langs)]],
                       "passage": " ".join(r[english] for r in rows[i:i + passage_verses])}, ensure_ascii=False)
    if rng.random() < 0.01:
      line = line[:len(line) // 2]  # malformed_json
    handles[n % files].write(line + "\n")
  for h in handles:
    h.close()
  return paths


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--records", type=int, default=200_000)
  ap.add_argument("--files", type=int, default=4)
  ap.add_argument("--passage-verses", type=int, default=3)
  ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: me5-small-q4 from me5_jax.fetch)")
  ap.add_argument("--dataflow-workers", type=int, nargs="+", default=[100, 1000], help="worker vCPUs to project for")
  args = ap.parse_args()
  tokenizer = args.tokenizer or fetch.fetch("me5-small-q4")
  from data_pipelines import builders  # TFDS import after argument errors
  builders.tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    files = write_inputs(fetch.fetch("bible_pd.tsv"), tmp, args.records, args.files, args.passage_verses)
    size = sum(os.path.getsize(p) for p in files)
    print(f"build: {args.records:,} stage-1 pairs ({size / 2**20:.0f} MiB JSONL in {args.files} files, 1 % damaged), "
          f"token ids stored (XLM-R), {os.cpu_count()} cores")
    print("| build | wall s | records/s | CPU s: this process | CPU s: workers | records per worker CPU-second |")
    print("|---|---|---|---|---|---|")
    runs = [("one process", None)] + [(f"Beam DirectRunner, {w} worker{'s' * (w > 1)}", w) for w in args.workers]
    per_worker_cpu, reports = {}, []
    for i, (name, workers) in enumerate(runs):
      options = (f"--direct_num_workers={workers} --direct_running_mode=multi_processing" if workers else None)
      start, own, children = time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
      report = builders.build("custom", os.path.join(tmp, f"data{i}"), files, tokenizer_dir=tokenizer,
                              beam_runner="DirectRunner" if workers else None, beam_options=options)
      wall = time.perf_counter() - start
      own, children = cpu(resource.RUSAGE_SELF) - own, cpu(resource.RUSAGE_CHILDREN) - children  # workers: reaped
      reports.append({k: v for k, v in report.items() if k != "path"})
      per_worker_cpu[workers] = report["valid"] / (children if workers else own)
      print(f"| {name} | {wall:.1f} | {report['valid'] / wall:,.0f} | {own:.1f} | {children:.1f} | "
            f"{per_worker_cpu[workers]:,.0f} |", flush=True)
    assert all(r == reports[0] for r in reports), "a build's report differs from the one-process build's"
  rate = per_worker_cpu[max(args.workers)]
  print(f"\nprojection for 1e9 pairs at {rate:,.0f} records per worker CPU-second (the {max(args.workers)}-worker "
        "run), workers busy all the time:")
  for n in args.dataflow_workers:
    print(f"  {n} worker vCPUs: {1e9 / (n * rate) / 3600:.1f} h")


if __name__ == "__main__":
  main()
