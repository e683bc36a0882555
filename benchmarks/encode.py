"""Inference throughput: me5_jax `Embedder.encode` vs sentence-transformers `encode`, same model, texts,
batch size, max length and CPU threads, in one run. Prints a table with texts/s and the ratio.

  python benchmarks/encode.py [--model DIR] [--texts FILE] [--num-texts 2000] [--batch-size 64]
                              [--max-length 128] [--repeats 3] [--threads N]

Default model: all-MiniLM-L6-v2; default texts: verses from bible_pd.tsv (both from `me5_jax.fetch`),
cycling over its 18 versions (12 languages). Both sides are warmed up by a first full pass, reported
separately (me5_jax's compiles one program per length bucket; the compile time is what JAX reports).
Timed passes alternate between the two systems so machine load hits both alike; the table shows the
best and the median wall-clock rate, and texts per CPU-second of the process (all its threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="HF folder (default: all-MiniLM-L6-v2 from me5_jax.fetch)")
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
  from me5_jax import fetch
  with open(fetch.fetch("bible_pd.tsv"), encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t")[1:] for line in f][1:]
  stride = max(1, len(rows) // n)
  texts = [row[i % len(row)] for i, row in ((i, rows[i * stride % len(rows)]) for i in range(n))]
  return [t for t in texts if t][:n]


def timed(fn) -> tuple[float, float, object]:
  """(wall seconds, CPU seconds of all this process's threads, result)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
  args = _parse_args()
  if args.model is None:
    from me5_jax import fetch
    args.model = fetch.fetch("all-MiniLM-L6-v2")
  cores = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(cores)
  # Pinning before jax/torch start: XLA sizes its thread pool from the affinity mask, torch is told.
  os.sched_setaffinity(0, cores[:threads])
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  import jax
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
  # A plain HF folder loads without a Normalize module: ask for it, both sides then return unit rows.
  run_st = lambda: st.encode(texts, batch_size=bs, convert_to_numpy=True, normalize_embeddings=True)

  compile_s = 0.0

  def count_compile_time(event: str, secs: float, **_):  # tracing, lowering, XLA: as JAX reports them
    nonlocal compile_s
    if "/compile/" in event:
      compile_s += secs

  jax.monitoring.register_event_duration_secs_listener(count_compile_time)
  runs = {"me5_jax": run_ours, "sentence-transformers": run_st}
  first = {name: timed(run) for name, run in runs.items()}  # me5_jax compiles every bucket shape it meets
  passes = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      passes[name].append(timed(run)[:2])

  # texts/s: best and median wall clock, and per CPU-second (steadier when other jobs share the cores).
  rates = {name: (n / min(w for w, _ in p), n / statistics.median(w for w, _ in p), n / min(c for _, c in p))
           for name, p in passes.items()}
  max_diff = np.abs(first["me5_jax"][2] - first["sentence-transformers"][2]).max()
  print(f"model {os.path.basename(os.path.normpath(args.model))}, {n} texts, batch {bs}, max length {max_len}, "
        f"{threads} CPU threads, fp32, {args.repeats} timed passes each; max |Δ| between the two = {max_diff:.1e}")
  print(f"{'system':<22} {'texts/s best':>13} {'texts/s median':>15} {'per CPU-s':>10} {'first pass s':>13} "
        f"{'compile s':>10}")
  compiled = {"me5_jax": f"{compile_s:.2f}", "sentence-transformers": "-"}
  for name, r in rates.items():
    print(f"{name:<22} {r[0]:>13.1f} {r[1]:>15.1f} {r[2]:>10.1f} {first[name][0]:>13.2f} {compiled[name]:>10}")
  ratio = [a / b for a, b in zip(rates["me5_jax"], rates["sentence-transformers"])]
  print(f"{'ratio me5_jax / ST':<22} {ratio[0]:>12.2f}x {ratio[1]:>14.2f}x {ratio[2]:>9.2f}x")

if __name__ == "__main__":
  main()
