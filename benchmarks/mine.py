"""Hard-negative mining, end to end and search alone: me5_jax on simulated CPU devices vs sentence-transformers'
`mine_hard_negatives` (its exact torch search, use_faiss=False), same model, texts and k, in one run.

  python benchmarks/mine.py [--model DIR] [--devices 8] [--every 40] [--every-corpus 4] [--top-k 50]
                            [--num-negatives 8] [--search-docs 1000000] [--search-queries 2048] [--dim 384]
                            [--skip-mining] [--skip-search]

Mining: the Bible mining set (`data_pipelines.bible.write_mining_set`: German verses de:e as queries, every
--every-th training verse; English en:4 verses as the corpus, every --every-corpus-th, each query's own
verse its positive), me5_jax's `mine.mine` (encode on every device, each distinct text once; exact top-k on
the devices; positives and their duplicates dropped) against `mine_hard_negatives(range_max=top_k,
num_negatives, sampling_strategy="top")`, both with the E5 prefixes, batch 64, max length 128. Both are
warmed up first on 512 corpus texts (me5_jax compiles one program per length bucket; the persistent
compile cache keeps them for later runs). The table gives the wall time of each, their ratio and how many
of the peer's negatives me5_jax also chose.

Search: a synthetic corpus of --search-docs random unit vectors and --search-queries queries, top 100.
me5_jax's `search.top_k` (corpus sharded over the devices) against the peer's loop (`util.cos_sim` over
query chunks, then `torch.topk`, as `mine_hard_negatives` does; 512 queries per chunk, since its default
16,384 × 1M scores would need 64 GB), plus `approximate=True` (`lax.approx_max_k`) with its recall
against the exact lists. The per-device rate (query-document scores per second per device) is what
projects to other devices: the work divides evenly over the corpus shards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
QUERY_COLUMN, CORPUS_COLUMN = "de:e", "en:4"
BATCH, MAX_LENGTH, SEARCH_K = 64, 128, 100


def _parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="HF folder (default: me5-small-q4 from me5_jax.fetch)")
  ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices for me5_jax")
  ap.add_argument("--every", type=int, default=40, help="every N-th training verse is a query")
  ap.add_argument("--every-corpus", type=int, default=4, help="every N-th training verse is in the corpus")
  ap.add_argument("--top-k", type=int, default=50)
  ap.add_argument("--num-negatives", type=int, default=8)
  ap.add_argument("--search-docs", type=int, default=1_000_000)
  ap.add_argument("--search-queries", type=int, default=2048)
  ap.add_argument("--dim", type=int, default=384)
  ap.add_argument("--skip-mining", action="store_true")
  ap.add_argument("--skip-search", action="store_true")
  return ap.parse_args()


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def bench_mining(args, model_dir: str) -> list[str]:
  import datasets
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.util import mine_hard_negatives

  from data_pipelines import bible
  from me5_jax import evaluate, mine
  from me5_jax.embedder import Embedder
  from me5_jax.tokenize import PASSAGE_PREFIX, QUERY_PREFIX

  folder = tempfile.mkdtemp(prefix="mine_bench_")
  bible.write_mining_set(folder, [QUERY_COLUMN], CORPUS_COLUMN, every=args.every, every_corpus=args.every_corpus)
  data = evaluate.load_retrieval(folder)
  positives = mine.positive_indices(data)
  print(f"mining set: {len(data.queries)} queries ({QUERY_COLUMN}), {len(data.passages)} documents "
        f"({CORPUS_COLUMN})", flush=True)

  embedder = Embedder.from_pretrained(model_dir, max_length=MAX_LENGTH)
  peer = SentenceTransformer(model_dir, device="cpu")
  peer.max_seq_length = MAX_LENGTH
  warm = data.passages[::max(1, len(data.passages) // 512)]
  embedder.encode(warm, prefix=PASSAGE_PREFIX, batch_size=BATCH)
  peer.encode(warm, prompt=PASSAGE_PREFIX, batch_size=BATCH, normalize_embeddings=True)

  cfg = mine.MiningConfig(top_k=args.top_k, num_negatives=args.num_negatives)
  ours_s, (records, _) = timed(lambda: mine.mine(embedder, data, cfg, batch_size=BATCH, max_length=MAX_LENGTH))
  pairs = datasets.Dataset.from_dict({"anchor": [data.queries[i] for i, pos in enumerate(positives) for _ in pos],
                                      "positive": [data.passages[j] for pos in positives for j in pos]})
  peer_s, mined = timed(lambda: mine_hard_negatives(
      pairs, peer, corpus=data.passages, range_max=args.top_k, num_negatives=args.num_negatives,
      sampling_strategy="top", query_prompt=QUERY_PREFIX, corpus_prompt=PASSAGE_PREFIX, batch_size=BATCH,
      output_format="n-tuple", use_faiss=False, verbose=False))
  peer_negatives = {(r["anchor"], r["positive"]): {r[f"negative_{i}"] for i in range(1, args.num_negatives + 1)}
                    for r in mined}
  shared = total = 0
  for r in records:
    theirs = peer_negatives.get((r["query"], r["positive"]))
    if theirs is not None:
      shared += len(theirs & set(r["negatives"]))
      total += len(theirs)
  texts = len(data.queries) + len(data.passages)
  return [
      f"### Mining: {len(data.queries)} queries × {len(data.passages)} documents, top {args.top_k}, "
      f"{args.num_negatives} negatives, {os.path.basename(model_dir.rstrip('/'))}",
      "",
      "| system | wall s | texts/s | ratio to peer |",
      "|---|---|---|---|",
      f"| me5_jax `mine.mine`, {len(embedder.devices)} CPU devices | {ours_s:.1f} | {texts / ours_s:.0f} | "
      f"**{peer_s / ours_s:.2f}×** |",
      f"| sentence-transformers `mine_hard_negatives` | {peer_s:.1f} | {texts / peer_s:.0f} | 1.00× |",
      "",
      f"Negatives me5_jax shares with the peer: {shared}/{total} ({shared / max(total, 1):.1%}); the peer "
      f"returned {len(mined)} of {len(records)} (query, positive) rows (it drops rows with fewer than "
      f"{args.num_negatives} negatives).",
  ]


def bench_search(args) -> list[str]:
  import jax
  import numpy as np
  import torch
  from sentence_transformers import util

  from me5_jax import search

  rng = np.random.default_rng(0)
  p_NxD = rng.standard_normal((args.search_docs, args.dim), dtype=np.float32)
  p_NxD /= np.linalg.norm(p_NxD, axis=1, keepdims=True)
  q_QxD = rng.standard_normal((args.search_queries, args.dim), dtype=np.float32)
  q_QxD /= np.linalg.norm(q_QxD, axis=1, keepdims=True)
  devices = jax.local_devices()
  search.top_k(q_QxD[:search.QUERY_BLOCK], p_NxD, SEARCH_K)  # compiles (the full run reuses the program)
  ours_s, (_, ours_QxK) = timed(lambda: search.top_k(q_QxD, p_NxD, SEARCH_K))
  search.top_k(q_QxD[:search.QUERY_BLOCK], p_NxD, SEARCH_K, approximate=True)
  approx_s, (_, approx_QxK) = timed(lambda: search.top_k(q_QxD, p_NxD, SEARCH_K, approximate=True))

  def peer():
    corpus = torch.from_numpy(p_NxD)
    idx = []
    for q0 in range(0, len(q_QxD), 512):
      scores = util.cos_sim(torch.from_numpy(q_QxD[q0:q0 + 512]), corpus)
      idx.append(torch.topk(scores, k=SEARCH_K, dim=1).indices)
    return torch.cat(idx).numpy()
  peer_s, peer_QxK = timed(peer)
  same = float(np.mean(ours_QxK == peer_QxK))
  recall = float(np.mean([len(set(a) & set(b)) / SEARCH_K for a, b in zip(approx_QxK, ours_QxK)]))
  scores = args.search_queries * args.search_docs
  per_device = lambda s: scores / s / len(devices) / 1e9  # noqa: E731
  return [
      f"### Search alone: {args.search_queries} queries × {args.search_docs:,} documents × {args.dim} dims, "
      f"top {SEARCH_K}",
      "",
      "| system | wall s | G scores/s | G scores/s per device | ratio to peer |",
      "|---|---|---|---|---|",
      f"| me5_jax `search.top_k`, {len(devices)} CPU devices | {ours_s:.1f} | {scores / ours_s / 1e9:.2f} | "
      f"{per_device(ours_s):.3f} | **{peer_s / ours_s:.2f}×** |",
      f"| me5_jax `search.top_k(approximate=True)` | {approx_s:.1f} | {scores / approx_s / 1e9:.2f} | "
      f"{per_device(approx_s):.3f} | {peer_s / approx_s:.2f}× |",
      f"| sentence-transformers (cos_sim + torch.topk) | {peer_s:.1f} | {scores / peer_s / 1e9:.2f} | | 1.00× |",
      "",
      f"Exact lists equal to the peer's, position by position: {same:.2%} (the rest: float rounding of near "
      f"ties). approx_max_k recall@{SEARCH_K} against exact: {recall:.4f} (exact off TPU).",
  ]


def main() -> None:
  args = _parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  from me5_jax import compile_cache, fetch
  compile_cache.enable()
  model_dir = args.model or fetch.fetch("me5-small-q4")
  import torch
  print(f"jax {jax.__version__} on {len(jax.local_devices())} CPU devices, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
  lines = []
  if not args.skip_search:
    lines += bench_search(args) + [""]
    print("\n".join(lines), flush=True)
  if not args.skip_mining:
    lines += bench_mining(args, model_dir)
  print("\n" + "\n".join(lines))


if __name__ == "__main__":
  main()
