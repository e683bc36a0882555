"""Device top-k (`me5_jax.search`) against the numpy reference `metrics.top_k_search` and the pure-Python
ranking of test_metrics, on 1 and 8 simulated devices."""
import jax
import numpy as np
import pytest

from me5_jax import metrics, search
from test_metrics import ref_ranking


def planted_ties(seed: int, num_q: int = 21, num_docs: int = 203):
  """Small-integer vectors (exact dot products, so ties are exact), plus duplicate documents."""
  rng = np.random.default_rng(seed)
  q_QxD = rng.integers(-1, 2, (num_q, 6)).astype(np.float32)
  p_NxD = rng.integers(-1, 2, (num_docs, 6)).astype(np.float32)
  p_NxD[[60, 130, 202]] = p_NxD[7]  # the same vector in several shards
  return q_QxD, p_NxD


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k,max_scores", [(1, 1 << 20), (10, 40), (40, 1 << 20), (203, 64), (500, 1 << 20)])
def test_device_top_k_equals_reference_with_ties(num_devices, k, max_scores):
  """k = 40 and 203 exceed a shard (26 rows on 8 devices); max_scores 40/64 force chunks of 5-8 rows."""
  q_QxD, p_NxD = planted_ties(k)
  score_QxK, row_QxK = search.top_k(q_QxD, p_NxD, k, devices=jax.devices()[:num_devices], query_block=8,
                                    max_scores_per_device=max_scores)
  ref_score, ref_row = metrics.top_k_search(q_QxD, p_NxD, k)
  assert row_QxK.dtype == np.int64 and row_QxK.shape == (21, min(k, 203))
  np.testing.assert_array_equal(row_QxK, ref_row)
  np.testing.assert_array_equal(score_QxK, ref_score)
  for i in (0, 20):  # and the reference itself, against plain Python
    scores = {j: float(q_QxD[i] @ p_NxD[j]) for j in range(203)}
    assert row_QxK[i].tolist() == ref_ranking(scores)[:k]


def test_device_top_k_float_embeddings_on_8_devices():
  """Real-valued unit vectors: the same rows as numpy (ties do not occur), scores to float32 rounding."""
  rng = np.random.default_rng(0)
  p_NxD = rng.standard_normal((1000, 32)).astype(np.float32)
  p_NxD /= np.linalg.norm(p_NxD, axis=1, keepdims=True)
  q_QxD = p_NxD[rng.permutation(1000)[:50]] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
  score_QxK, row_QxK = search.top_k(q_QxD, p_NxD, 100)
  ref_score, ref_row = metrics.top_k_search(q_QxD, p_NxD, 100)
  assert (row_QxK == ref_row).mean() > 0.999
  np.testing.assert_allclose(score_QxK, ref_score, atol=1e-5)


def test_approximate_search_runs_and_is_exact_off_tpu():
  q_QxD, p_NxD = planted_ties(3)
  _, row_QxK = search.top_k(q_QxD, p_NxD, 10, approximate=True)
  ref_score, _ = metrics.top_k_search(q_QxD, p_NxD, 10)
  got_score = np.take_along_axis(q_QxD @ p_NxD.T, row_QxK, 1)
  np.testing.assert_array_equal(np.sort(got_score, 1), np.sort(ref_score, 1))  # same scores; ties may differ


def test_empty_corpus_is_refused():
  with pytest.raises(ValueError, match="non-empty corpus"):
    search.top_k(np.zeros((2, 4), np.float32), np.zeros((0, 4), np.float32), 5)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_device_p_at_1_equals_reference_with_ties(num_devices):
  rng = np.random.default_rng(0)
  src = rng.integers(-1, 2, (70, 4)).astype(np.float32)
  tgt = src + rng.integers(-1, 2, (70, 4)) * (rng.random((70, 1)) < 0.5)
  got = search.p_at_1(src, tgt.astype(np.float32), devices=jax.devices()[:num_devices])
  assert got == metrics.p_at_1(src, tgt) and 0 < got < 1
