"""Evaluation metrics in plain numpy: exact top-k search, ranking metrics, bitext P@1, correlations.

Ranking follows one rule everywhere: score descending, ties broken by document id ascending. The
search keeps the corpus in id order, so ties fall to the lower column index and `rank` re-sorting a
run gives the same list. (trec_eval breaks ties by docno descending; with float cosines ties only come
from duplicate passages, and a fixed, documented rule matters more than which one.)

nDCG follows trec_eval / pytrec_eval `ndcg_cut`: gain = the qrels grade (linear), only grades > 0 count,
discount log2(rank + 1) with rank from 1, ideal DCG from the query's own qrels sorted by grade.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, float]]
Run = Mapping[str, Mapping[str, float]]


# ---------------------------------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------------------------------

def _top_k_rows(sim_QxC: np.ndarray, k: int) -> np.ndarray:
  """Column indices of each row's k best scores (unordered), ties at the cut going to lower indices.

  argpartition alone picks arbitrarily among scores equal to the k-th best; the few rows where that
  matters (more than k scores ≥ the k-th) are redone exactly.
  """
  if k >= sim_QxC.shape[1]:
    return np.broadcast_to(np.arange(sim_QxC.shape[1]), sim_QxC.shape).copy()
  top_QxK = np.argpartition(-sim_QxC, k - 1, axis=1)[:, :k]
  kth_Q = np.take_along_axis(sim_QxC, top_QxK, axis=1).min(axis=1)
  crowded_Q = (sim_QxC >= kth_Q[:, None]).sum(axis=1) > k
  for q in np.nonzero(crowded_Q)[0]:
    cand = np.nonzero(sim_QxC[q] >= kth_Q[q])[0]  # ascending indices
    top_QxK[q] = cand[np.argsort(-sim_QxC[q, cand], kind="stable")[:k]]
  return top_QxK


def _sorted_top(score_QxM: np.ndarray, idx_QxM: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  order_QxM = np.lexsort((idx_QxM, -score_QxM), axis=1)[:, :k]
  return np.take_along_axis(score_QxM, order_QxM, 1), np.take_along_axis(idx_QxM, order_QxM, 1)


def top_k_search(q_QxD: np.ndarray, p_NxD: np.ndarray, k: int, query_chunk: int = 1024,
                 corpus_chunk: int = 32768) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product search (cosine for L2-normalised rows) over the whole corpus.

  Memory stays at query_chunk × corpus_chunk scores: each corpus chunk contributes its own top k,
  merged with the running top k. Returns (score_QxK float32, index_QxK int64), best first, ties by
  lower index; K = min(k, N).
  """
  k = min(k, len(p_NxD))
  score_QxK = np.zeros((len(q_QxD), k), np.float32)
  idx_QxK = np.zeros((len(q_QxD), k), np.int64)
  for q0 in range(0, len(q_QxD), query_chunk):
    q_BxD = q_QxD[q0:q0 + query_chunk]
    best_s = np.zeros((len(q_BxD), 0), np.float32)
    best_i = np.zeros((len(q_BxD), 0), np.int64)
    for c0 in range(0, len(p_NxD), corpus_chunk):
      sim_BxC = (q_BxD @ p_NxD[c0:c0 + corpus_chunk].T).astype(np.float32)
      top_BxK = _top_k_rows(sim_BxC, k)
      best_s = np.concatenate([best_s, np.take_along_axis(sim_BxC, top_BxK, 1)], 1)
      best_i = np.concatenate([best_i, top_BxK + c0], 1)
      best_s, best_i = _sorted_top(best_s, best_i, k)
    score_QxK[q0:q0 + query_chunk], idx_QxK[q0:q0 + query_chunk] = best_s, best_i
  return score_QxK, idx_QxK


# ---------------------------------------------------------------------------------------------------
# Ranking metrics (pytrec_eval definitions)
# ---------------------------------------------------------------------------------------------------

def rank(scores: Mapping[str, float]) -> list[str]:
  """Doc ids by score descending, ties by doc id ascending."""
  return sorted(scores, key=lambda d: (-scores[d], d))


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, float], k: int = 10) -> float:
  discount_K = 1.0 / np.log2(np.arange(2, k + 2))
  gains = np.array([max(rels.get(d, 0.0), 0.0) for d in ranked[:k]])
  ideal = np.sort(np.array([g for g in rels.values() if g > 0], float))[::-1][:k]
  idcg = float(ideal @ discount_K[:len(ideal)])
  return float(gains @ discount_K[:len(gains)]) / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, float], k: int = 100) -> float:
  relevant = {d for d, g in rels.items() if g > 0}
  return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, float], k: int = 10) -> float:
  for i, d in enumerate(ranked[:k]):
    if rels.get(d, 0) > 0:
      return 1.0 / (i + 1)
  return 0.0


def retrieval_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
  """nDCG@10, Recall@100 and MRR@10 averaged over the queries of `qrels` with ≥1 grade > 0.

  A query with relevant docs but no entry in `run` scores 0 (as in pytrec_eval with empty results).
  """
  qids = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
  per_query = {"ndcg@10": [], "recall@100": [], "mrr@10": []}
  for q in qids:
    ranked = rank(run.get(q, {}))
    per_query["ndcg@10"].append(ndcg_at_k(ranked, qrels[q], 10))
    per_query["recall@100"].append(recall_at_k(ranked, qrels[q], 100))
    per_query["mrr@10"].append(mrr_at_k(ranked, qrels[q], 10))
  return {name: float(np.mean(v)) if v else 0.0 for name, v in per_query.items()}


# ---------------------------------------------------------------------------------------------------
# Bitext and STS
# ---------------------------------------------------------------------------------------------------

def p_at_1(src_NxD: np.ndarray, tgt_NxD: np.ndarray, chunk: int = 2048) -> float:
  """Fraction of rows i whose nearest target (inner product; first index on ties) is row i."""
  hits = 0
  for s0 in range(0, len(src_NxD), chunk):
    best_B = np.argmax(src_NxD[s0:s0 + chunk] @ tgt_NxD.T, axis=1)
    hits += int(np.sum(best_B == np.arange(s0, s0 + len(best_B))))
  return hits / len(src_NxD)


def average_ranks(x_N: np.ndarray) -> np.ndarray:
  """Ranks 1..N; tied values share the mean of the ranks they span (as Spearman's rho needs)."""
  order_N = np.argsort(x_N, kind="stable")
  sorted_N = x_N[order_N]
  starts = np.concatenate([[True], sorted_N[1:] != sorted_N[:-1]])
  group_N = np.cumsum(starts) - 1
  first = np.nonzero(starts)[0]
  last = np.append(first[1:], len(x_N)) - 1
  ranks_N = np.empty(len(x_N), float)
  ranks_N[order_N] = (first + last)[group_N] / 2 + 1
  return ranks_N


def pearson(x_N: np.ndarray, y_N: np.ndarray) -> float:
  x = np.asarray(x_N, float) - np.mean(x_N)
  y = np.asarray(y_N, float) - np.mean(y_N)
  return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def spearman(x_N: np.ndarray, y_N: np.ndarray) -> float:
  return pearson(average_ranks(np.asarray(x_N)), average_ranks(np.asarray(y_N)))
