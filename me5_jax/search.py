"""Exact top-k inner-product search on the devices: what `evaluate` and `mine` rank a corpus with.

The corpus is split row-wise over the devices (a 1-D mesh, axis "corpus"); queries go in fixed-size blocks,
replicated. Each device scans its shard in chunks, keeping a running top k of (score, row), so a device
holds at most block × chunk scores at once (`max_scores_per_device`) however large the corpus; the shards'
lists are then all-gathered and merged with one more top k. The result equals `metrics.top_k_search`, the
numpy reference, including its tie rule (equal scores: lower corpus row first): `lax.top_k` puts the
lower position first among equal values, and every merge concatenates candidates in row order (earlier
chunks before later ones, device d before device d + 1), so position order is row order.

`approximate=True` uses `lax.approx_max_k` per chunk instead (TPU's fast partial reduction, with
`recall_target`); off TPU it is exact. The tie rule is then not guaranteed; `benchmarks/mine.py` reports
its measured recall.

Runs on the local devices: with several processes, every process searches its own queries against the
whole corpus it holds.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from me5_jax import dispatch

AXIS = "corpus"
QUERY_BLOCK = 512            # queries per dispatched search
MAX_SCORES_PER_DEVICE = 1 << 26  # block × chunk scores a device materialises at once (256 MB in float32)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, num_docs: int, shard_rows: int, chunk_rows: int, k_local: int, k: int,
               approximate: bool, recall_target: float):
  """jit(q_BxD replicated, p sharded by rows) → (score_BxK, row_BxK) replicated, best first."""
  num_chunks = shard_rows // chunk_rows

  def chunk_top(sim_BxC, kk):
    if approximate:
      return jax.lax.approx_max_k(sim_BxC, kk, recall_target=recall_target)
    return jax.lax.top_k(sim_BxC, kk)

  def merge(score_BxM, row_BxM, kk):
    score_BxK, pos_BxK = jax.lax.top_k(score_BxM, kk)  # lower position first on ties = lower row
    return score_BxK, jnp.take_along_axis(row_BxM, pos_BxK, axis=1)

  def local(q_BxD, p_SxD):
    first_row = jax.lax.axis_index(AXIS) * shard_rows
    chunks_NxCxD = p_SxD.reshape(num_chunks, chunk_rows, p_SxD.shape[-1])

    def step(best, xs):
      c, chunk_CxD = xs
      sim_BxC = jnp.dot(q_BxD, chunk_CxD.T, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
      row_C = first_row + c * chunk_rows + jnp.arange(chunk_rows, dtype=jnp.int32)
      sim_BxC = jnp.where(row_C < num_docs, sim_BxC, -jnp.inf)  # padding rows never rank
      score_Bxk, pos_Bxk = chunk_top(sim_BxC, min(k_local, chunk_rows))
      score_BxM = jnp.concatenate([best[0], score_Bxk], axis=1)  # earlier rows first
      row_BxM = jnp.concatenate([best[1], row_C[pos_Bxk]], axis=1)
      return merge(score_BxM, row_BxM, k_local), None

    init = (jnp.full((q_BxD.shape[0], k_local), -jnp.inf, jnp.float32),
            jnp.full((q_BxD.shape[0], k_local), num_docs, jnp.int32))
    (score_Bxk, row_Bxk), _ = jax.lax.scan(step, init, (jnp.arange(num_chunks, dtype=jnp.int32), chunks_NxCxD))
    all_score = jax.lax.all_gather(score_Bxk, AXIS, axis=1, tiled=True)  # [B, devices × k_local], device order
    all_row = jax.lax.all_gather(row_Bxk, AXIS, axis=1, tiled=True)
    return merge(all_score, all_row, k)

  # check_vma off: the merged lists are replicated (every device merges the same all-gathered candidates),
  # which the varying-axis check cannot infer through the scan and the all-gather.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                               check_vma=False))


def top_k(q_QxD: np.ndarray, p_NxD: np.ndarray, k: int, *, devices: Sequence[jax.Device] | None = None,
          approximate: bool = False, recall_target: float = 0.95, query_block: int = QUERY_BLOCK,
          max_scores_per_device: int = MAX_SCORES_PER_DEVICE) -> tuple[np.ndarray, np.ndarray]:
  """(score_QxK float32, row_QxK int64), best first, ties by lower row; K = min(k, N). Same contract as
  `metrics.top_k_search`, computed on `devices` (default: all local devices)."""
  devices = list(devices if devices is not None else jax.local_devices())
  q_QxD, p_NxD = np.asarray(q_QxD, np.float32), np.asarray(p_NxD, np.float32)
  num_q, (num_docs, dim) = len(q_QxD), p_NxD.shape
  if num_docs == 0 or k < 1:
    raise ValueError(f"top_k: need a non-empty corpus and k >= 1 (corpus {num_docs} rows, k={k})")
  k = min(k, num_docs)
  block = min(query_block, _round_up(max(num_q, 1), 8))
  shard_rows = -(-num_docs // len(devices))
  chunk_rows = max(1, min(shard_rows, max_scores_per_device // block))
  shard_rows = _round_up(shard_rows, chunk_rows)
  mesh = Mesh(np.array(devices), (AXIS,))
  padded_NxD = np.zeros((shard_rows * len(devices), dim), np.float32)
  padded_NxD[:num_docs] = p_NxD
  corpus = jax.device_put(padded_NxD, NamedSharding(mesh, P(AXIS)))
  replicated = NamedSharding(mesh, P())
  search = _search_fn(mesh, num_docs, shard_rows, chunk_rows, min(k, shard_rows), k, approximate,
                      recall_target)

  score_QxK = np.zeros((num_q, k), np.float32)
  row_QxK = np.zeros((num_q, k), np.int64)

  def fetch(done):
    q0, (score_BxK, row_BxK) = done
    n = min(block, num_q - q0)
    score_QxK[q0:q0 + n] = np.asarray(score_BxK)[:n]
    row_QxK[q0:q0 + n] = np.asarray(row_BxK)[:n]

  in_flight = dispatch.InFlight(dispatch.max_in_flight(devices), finish=fetch)
  for q0 in range(0, num_q, block):
    q_BxD = np.zeros((block, dim), np.float32)
    q_BxD[:min(block, num_q - q0)] = q_QxD[q0:q0 + block]
    in_flight.admit()
    in_flight.add((q0, search(jax.device_put(q_BxD, replicated), corpus)))
  in_flight.drain()
  return score_QxK, row_QxK


def p_at_1(src_NxD: np.ndarray, tgt_NxD: np.ndarray, devices: Sequence[jax.Device] | None = None) -> float:
  """Fraction of rows i whose nearest target (first row on ties) is row i: `metrics.p_at_1` on the devices."""
  _, row_Nx1 = top_k(src_NxD, tgt_NxD, 1, devices=devices)
  return float(np.mean(row_Nx1[:, 0] == np.arange(len(src_NxD))))
