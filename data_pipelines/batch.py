"""The batch contract between the input pipeline and the train step, in one place (DESIGN.md "Batch
contract"): its keys, dtypes and shapes (`shapes`), the packed layout's slot arithmetic (`slots_per_row`)
and the passage hashes for false-negative masking (`hash_ids`, `hash_ragged`). The Batcher builds batches to it,
`me5_jax.aot` compiles against it, the train step and the trainer's FLOP count read it.

Numpy only (no JAX): the read path imports it without importing an accelerator runtime.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from data_pipelines.mixture import hash64

PADDED_TOKEN_KEYS = ("query_ids", "query_mask", "passage_ids", "passage_mask")
PACKED_TOKEN_KEYS = ("packed_ids", "packed_segments")
SLOTS_PER_TOKEN = 4  # a packed row of L tokens holds at most L / 4 texts
SALT_PASSAGE_HASH = 31


def shapes(batch_size: int, query_len: int, passage_len: int, group_size: int, teacher: bool,
           packed_rows: int = 0) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """key → (shape, dtype) of a global batch. packed_rows > 0: the packed layout, that many rows of
  max(query_len, passage_len) tokens; else the padded layout."""
  b, g, i32 = batch_size, group_size, np.dtype(np.int32)
  if packed_rows:
    length = max(query_len, passage_len)
    out = {"packed_ids": ((packed_rows, length), i32), "packed_segments": ((packed_rows, length), i32),
           "query_slots": ((b,), i32), "passage_slots": ((b, g), i32)}
  else:
    out = {"query_ids": ((b, query_len), i32), "query_mask": ((b, query_len), i32),
           "passage_ids": ((b, g, passage_len), i32), "passage_mask": ((b, g, passage_len), i32)}
  out["passage_hash"] = ((b, g, 2), i32)
  if teacher:
    out["teacher_scores"] = ((b, g), np.dtype(np.float32))
  return out


def is_packed(batch: Mapping) -> bool:
  return "packed_ids" in batch


def token_arrays(batch: Mapping) -> list:
  """The id arrays the encoder runs on: [packed_ids], or [query_ids, passage_ids]."""
  return [batch["packed_ids"]] if is_packed(batch) else [batch["query_ids"], batch["passage_ids"]]


def slots_per_row(row_length: int) -> int:
  """How many texts a packed row of row_length tokens may hold (the pooling output's S)."""
  return max(1, row_length // SLOTS_PER_TOKEN)


def hash_ids(ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
  """A 64-bit hash of each row's unmasked token ids, as two int32 words: the batch's `passage_hash`.

  Independent of padding length, of the ids' integer dtype and of the process (Python's `hash()` is salted
  per process, so it would miss duplicates that sit on different hosts). Any leading shape: [..., L] → [..., 2].
  """
  ids_BxL, mask_BxL = np.asarray(ids_BxL), np.asarray(mask_BxL)
  if ids_BxL.shape != mask_BxL.shape or ids_BxL.ndim < 1:
    raise ValueError(f"hash_ids: ids {ids_BxL.shape} and mask {mask_BxL.shape} must have one shape [..., L]")
  rows_RxL = ids_BxL.reshape(-1, ids_BxL.shape[-1])
  keep_RxL = mask_BxL.reshape(rows_RxL.shape).astype(bool)
  return hash_ragged(rows_RxL[keep_RxL], keep_RxL.sum(1)).reshape(*ids_BxL.shape[:-1], 2)


def hash_ragged(tokens_K: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
  """`hash_ids` of N rows given as one flat array of their tokens, row after row, and their lengths:
  [N, 2] int32 (the packed batcher's rows never exist padded).

  Whole-batch array operations, no per-row Python: each (token, position in its row) pair is hashed
  (splitmix64 of the two as one 64-bit word, a bijection, so different pairs never share a value), a row
  sums its pairs' hashes (wrapping), and the row's length and sum are hashed once more."""
  lengths_N = np.asarray(lengths_N, np.int64)
  starts_N = np.cumsum(lengths_N) - lengths_N
  tokens_K = np.asarray(tokens_K).astype(np.int64)
  position_K = np.arange(len(tokens_K)) - np.repeat(starts_N, lengths_N)
  pair_K = hash64((tokens_K & 0xFFFFFFFF) << 32 | position_K)
  sum_N = np.zeros(len(lengths_N), np.uint64)
  nonempty_N = lengths_N > 0
  if nonempty_N.any():
    sum_N[nonempty_N] = np.add.reduceat(pair_K, starts_N[nonempty_N])
  return hash64(SALT_PASSAGE_HASH, lengths_N, sum_N).view("<i4").reshape(len(lengths_N), 2)
