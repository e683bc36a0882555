"""Inference throughput: me5_jax `Embedder.encode` vs sentence-transformers `encode`, same model, texts,
batch size, max length and CPU threads, in one run. Prints a table with texts/s and the ratio.

  python benchmarks/encode.py [--model DIR] [--texts FILE] [--num-texts 2000] [--batch-size 64]
                              [--max-length 128] [--repeats 3] [--threads N]

Default model: .cache/realdata/all-MiniLM-L6-v2; default texts: verses from .cache/realdata/bible_pd.tsv,
cycling over its 18 versions (12 languages). Both sides are warmed up first; me5_jax's first pass (which
compiles one program per length bucket) is reported separately as compile time. Timed passes alternate
between the two systems so machine load hits both alike; the table shows the best and the median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.environ.get("ME5_REALDATA", os.path.join(REPO, ".cache", "realdata"))


def _parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=os.path.join(REALDATA, "all-MiniLM-L6-v2"))
  ap.add_argument("--texts", default=None, help="UTF-8 file, one text per line (default: Bible verses)")
  ap.add_argument("--num-texts", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=None, help="CPU cores for both (default: all available)")
  return ap.parse_args()


def load_texts(path: str | None, n: int) -> list[str]:
  """`n` texts: the file's lines, or Bible verses spread over the whole book and every version."""
  if path:
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\r\n") for line in f][:n]
  tsv = os.path.join(REALDATA, "bible_pd.tsv")
  if not os.path.exists(tsv):
    sys.exit(f"error: {tsv} is missing: run `bash ../shared/realdata/fetch.sh {REALDATA}` or pass --texts")
  with open(tsv, encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t")[1:] for line in f][1:]
  stride = max(1, len(rows) // n)
  texts = [row[i % len(row)] for i, row in ((i, rows[i * stride % len(rows)]) for i in range(n))]
  return [t for t in texts if t][:n]


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  args = _parse_args()
  cores = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(cores)
  # Pinning before jax/torch start: XLA sizes its thread pool from the affinity mask, torch is told.
  os.sched_setaffinity(0, cores[:threads])
  import numpy as np
  import torch
  from sentence_transformers import SentenceTransformer

  from me5_jax.embedder import Embedder
  torch.set_num_threads(threads)

  texts = load_texts(args.texts, args.num_texts)
  n, bs, max_len = len(texts), args.batch_size, args.max_length
  ours = Embedder.from_pretrained(args.model)
  st = SentenceTransformer(args.model, device="cpu")
  st.max_seq_length = max_len
  run_ours = lambda: ours.encode(texts, batch_size=bs, max_length=max_len)
  run_st = lambda: st.encode(texts, batch_size=bs, convert_to_numpy=True)

  first_ours_s, emb_ours = timed(run_ours)  # compiles every bucket shape it meets
  first_st_s, emb_st = timed(run_st)
  times = {"me5_jax": [], "sentence-transformers": []}
  for _ in range(args.repeats):
    times["me5_jax"].append(timed(run_ours)[0])
    times["sentence-transformers"].append(timed(run_st)[0])

  rate = {k: (n / min(v), n / statistics.median(v)) for k, v in times.items()}
  first = {"me5_jax": first_ours_s, "sentence-transformers": first_st_s}
  print(f"model {os.path.basename(os.path.normpath(args.model))}, {n} texts, batch {bs}, max length {max_len}, "
        f"{threads} CPU threads, fp32; max |Δ| between the two = {np.abs(emb_ours - emb_st).max():.1e}")
  print(f"{'system':<22} {'texts/s best':>13} {'texts/s median':>15} {'first pass s':>13} {'compile s':>10}")
  for name in times:
    compile_s = first[name] - statistics.median(times[name]) if name == "me5_jax" else 0.0
    print(f"{name:<22} {rate[name][0]:>13.1f} {rate[name][1]:>15.1f} {first[name]:>13.2f} {compile_s:>10.2f}")
  ratio_best = rate["me5_jax"][0] / rate["sentence-transformers"][0]
  ratio_median = rate["me5_jax"][1] / rate["sentence-transformers"][1]
  print(f"{'ratio me5_jax / ST':<22} {ratio_best:>12.2f}x {ratio_median:>14.2f}x")


if __name__ == "__main__":
  main()
