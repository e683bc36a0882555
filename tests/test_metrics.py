"""me5_jax.metrics against references written here with plain loops (and pytrec_eval / scipy when present).

The `ref_*` functions are the independent definitions; test_evaluate_cli.py reuses them.
"""
import functools
import math

import numpy as np
import pytest

from me5_jax import metrics


# ---------------------------------------------------------------------------------------------------
# Loop references
# ---------------------------------------------------------------------------------------------------

def ref_ranking(scores: dict) -> list:
  """Score descending, then doc id ascending, by an explicit comparator."""
  def cmp(a, b):
    if scores[a] != scores[b]:
      return -1 if scores[a] > scores[b] else 1
    return -1 if a < b else (1 if a > b else 0)
  return sorted(scores, key=functools.cmp_to_key(cmp))


def ref_query_metrics(ranked: list, rels: dict) -> dict:
  dcg = 0.0
  for i in range(min(10, len(ranked))):
    grade = rels.get(ranked[i], 0)
    if grade > 0:
      dcg += grade / math.log2(i + 2)
  grades = sorted([g for g in rels.values() if g > 0], reverse=True)
  idcg = 0.0
  for i in range(min(10, len(grades))):
    idcg += grades[i] / math.log2(i + 2)
  n_rel, found = 0, 0
  for d, g in rels.items():
    if g > 0:
      n_rel += 1
      if d in ranked[:100]:
        found += 1
  rr = 0.0
  for i in range(min(10, len(ranked))):
    if rels.get(ranked[i], 0) > 0:
      rr = 1.0 / (i + 1)
      break
  return {"ndcg@10": dcg / idcg, "recall@100": found / n_rel, "mrr@10": rr}


def ref_retrieval_metrics(run: dict, qrels: dict) -> dict:
  sums, n = {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}, 0
  for q, rels in qrels.items():
    if not any(g > 0 for g in rels.values()):
      continue
    n += 1
    for name, value in ref_query_metrics(ref_ranking(run.get(q, {})), rels).items():
      sums[name] += value
  return {name: s / n for name, s in sums.items()}


def ref_p_at_1(src: np.ndarray, tgt: np.ndarray) -> float:
  hits = 0
  for i in range(len(src)):
    best_j, best = 0, -np.inf
    for j in range(len(tgt)):
      s = float(np.dot(src[i], tgt[j]))
      if s > best:
        best_j, best = j, s
    hits += best_j == i
  return hits / len(src)


def ref_average_ranks(x) -> list:
  out = []
  for v in x:
    less = sum(1 for w in x if w < v)
    equal = sum(1 for w in x if w == v)
    out.append(less + (equal + 1) / 2)
  return out


def ref_pearson(x, y) -> float:
  mx, my = sum(x) / len(x), sum(y) / len(y)
  sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
  sxx = sum((a - mx) ** 2 for a in x)
  syy = sum((b - my) ** 2 for b in y)
  return sxy / math.sqrt(sxx * syy)


# ---------------------------------------------------------------------------------------------------
# Random runs with graded qrels and tied scores
# ---------------------------------------------------------------------------------------------------

def random_run_and_qrels(seed: int, n_queries=40, n_docs=160, tied=True):
  rng = np.random.default_rng(seed)
  docs = [f"d{i:03d}" for i in rng.permutation(n_docs)]
  run, qrels = {}, {}
  for q in range(n_queries):
    qid = f"q{q}"
    if q % 13 != 5:  # some queries have no qrels at all
      judged = rng.choice(docs, size=rng.integers(1, 25), replace=False)
      qrels[qid] = {d: int(rng.integers(-1, 4)) for d in judged}  # grades -1..3; some queries none > 0
    if q % 11 != 3:  # some queries have no run
      retrieved = rng.choice(docs, size=rng.integers(1, n_docs + 1), replace=False)
      values = rng.integers(0, 6, len(retrieved)) / 5 if tied else rng.random(len(retrieved))
      run[qid] = {d: float(s) for d, s in zip(retrieved, values)}
  return run, qrels


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_metrics_match_loop_reference(seed):
  run, qrels = random_run_and_qrels(seed)
  got = metrics.retrieval_metrics(run, qrels)
  want = ref_retrieval_metrics(run, qrels)
  for name in want:
    assert abs(got[name] - want[name]) <= 1e-6, (name, got, want)
  for q, rels in qrels.items():
    ranked = metrics.rank(run.get(q, {}))
    assert ranked == ref_ranking(run.get(q, {}))
    if any(g > 0 for g in rels.values()):
      ref = ref_query_metrics(ranked, rels)
      assert abs(metrics.ndcg_at_k(ranked, rels, 10) - ref["ndcg@10"]) <= 1e-6
      assert abs(metrics.recall_at_k(ranked, rels, 100) - ref["recall@100"]) <= 1e-6
      assert abs(metrics.mrr_at_k(ranked, rels, 10) - ref["mrr@10"]) <= 1e-6


def test_retrieval_metrics_match_pytrec_eval():
  """Untied scores (trec_eval breaks ties by docno descending, we by doc id ascending)."""
  pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec-eval-terrier not installed")
  run, qrels = random_run_and_qrels(7, tied=False)
  judged = {q: r for q, r in qrels.items() if any(g > 0 for g in r.values())}
  trec = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut_10", "recall_100", "recip_rank"}).evaluate(
      {q: run.get(q, {}) for q in judged})
  for q, rels in judged.items():
    ranked = metrics.rank(run.get(q, {}))
    rr = trec[q]["recip_rank"]
    assert abs(metrics.ndcg_at_k(ranked, rels, 10) - trec[q]["ndcg_cut_10"]) <= 1e-6
    assert abs(metrics.recall_at_k(ranked, rels, 100) - trec[q]["recall_100"]) <= 1e-6
    assert abs(metrics.mrr_at_k(ranked, rels, 10) - (rr if rr >= 0.1 else 0.0)) <= 1e-6


@pytest.mark.parametrize("k,query_chunk,corpus_chunk", [(10, 4, 500), (37, 3, 128), (100, 7, 64), (10, 1024, 50), (600, 5, 128)])
def test_top_k_search_is_exact_with_ties(k, query_chunk, corpus_chunk):
  """Small-integer vectors make exact score ties common, including at every chunk's k-th place."""
  rng = np.random.default_rng(k)
  q_QxD = rng.integers(-1, 2, (19, 6)).astype(np.float32)
  p_NxD = rng.integers(-1, 2, (500, 6)).astype(np.float32)
  score_QxK, idx_QxK = metrics.top_k_search(q_QxD, p_NxD, k, query_chunk, corpus_chunk)
  assert idx_QxK.shape == (19, min(k, 500))
  for i in range(len(q_QxD)):
    scores = {j: sum(float(a) * float(b) for a, b in zip(q_QxD[i], p_NxD[j])) for j in range(500)}
    want = ref_ranking(scores)[:k]
    assert idx_QxK[i].tolist() == want
    assert score_QxK[i].tolist() == [scores[j] for j in want]


def test_p_at_1_matches_loop_with_ties():
  rng = np.random.default_rng(0)
  src = rng.integers(-1, 2, (70, 4)).astype(np.float32)
  tgt = src + rng.integers(-1, 2, (70, 4)) * (rng.random((70, 1)) < 0.5)
  assert metrics.p_at_1(src, tgt, chunk=16) == pytest.approx(ref_p_at_1(src, tgt), abs=1e-12)
  assert 0 < ref_p_at_1(src, tgt) < 1


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_references_with_ties(seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 8, 60).astype(float)  # many ties
  y = x + rng.normal(0, 3, 60)
  y[::7] = y[0]  # ties in y too
  assert np.allclose(metrics.average_ranks(x), ref_average_ranks(list(x)), atol=0)
  want_spearman = ref_pearson(ref_average_ranks(list(x)), ref_average_ranks(list(y)))
  assert abs(metrics.spearman(x, y) - want_spearman) <= 1e-9
  assert abs(metrics.pearson(x, y) - ref_pearson(list(x), list(y))) <= 1e-9
  stats = pytest.importorskip("scipy.stats")
  assert abs(metrics.spearman(x, y) - stats.spearmanr(x, y).statistic) <= 1e-9
  assert abs(metrics.pearson(x, y) - stats.pearsonr(x, y).statistic) <= 1e-9
