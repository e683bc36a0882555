"""Batched inference: texts → L2-normalised float32 embeddings, in input order.

Texts are sorted by token count so each batch pads little, and every batch is padded to a
(batch_size, bucket length) shape from a short list, so a whole corpus compiles a handful of programs.
Buckets step by about 1.5x: on 2000 Bible verses (MiniLM, max length 128) that pads 16 % more tokens
than per-batch padding, against 36 % for powers of two, at the price of a few more compiles.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from me5_jax import dispatch, encoder as enc
from me5_jax import hf_io
from me5_jax.tokenize import PAD_MULTIPLE, Tokenizer, round_up, with_prefix
from me5_jax.variants import EncoderConfig

_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_length(n: int, max_length: int) -> int:
  """Smallest bucket ≥ n, capped at max_length rounded up to 8."""
  cap = round_up(max_length, PAD_MULTIPLE)
  return min([b for b in _BUCKETS if b >= n] + [cap])


@functools.partial(jax.jit, static_argnums=3)
def _embed_jit(params, ids_BxL, mask_BxL, cfg):
  return enc.embed(params, ids_BxL, mask_BxL, cfg, right_padded=True)  # Tokenizer.pad pads on the right


class Embedder:
  """An encoder, its params and its tokenizer: what `embed`, `evaluate` and the trainer's evals use."""

  def __init__(self, cfg: EncoderConfig, params: Any, tokenizer: Tokenizer):
    # Moved to the device once: numpy params would be copied in again on every batch.
    self.cfg, self.params, self.tokenizer = cfg, jax.device_put(params), tokenizer

  @classmethod
  def from_pretrained(cls, path: str, dtype: str = "float32", max_length: int | None = None) -> "Embedder":
    hf_io.check_model_dir(path)
    tokenizer = Tokenizer.from_dir(path, max_length)
    cfg, params = hf_io.load_pretrained(path, dtype=dtype)
    tokenizer.max_length = min(tokenizer.max_length, cfg.max_tokens)
    return cls(cfg, params, tokenizer)

  def encode(self, texts: Sequence[str], prefix: str | None = None, batch_size: int = 64,
             max_length: int | None = None, progress: bool = False) -> np.ndarray:
    """Returns float32 [N, D] rows in the order of `texts` (empty strings included)."""
    max_length = min(max_length or self.tokenizer.max_length, self.cfg.max_tokens)
    rows = self.tokenizer.token_ids(with_prefix(texts, prefix), max_length)
    out_NxD = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    order = np.argsort([-len(r) for r in rows], kind="stable")
    start, last_report = time.time(), 0.0

    def fetch(done):
      idx, emb_BxD = done
      out_NxD[idx] = np.asarray(emb_BxD)[:len(idx)]

    # With 2 in flight the next batch is dispatched before the last one is fetched, which hides the copy.
    devices = jax.tree.leaves(self.params)[0].devices()  # where each batch is encoded
    in_flight = dispatch.InFlight(dispatch.max_in_flight(devices), finish=fetch)
    for b in range(0, len(order), batch_size):
      idx = order[b:b + batch_size]
      batch_rows = [rows[i] for i in idx]
      batch_rows += [[self.tokenizer.pad_id]] * (batch_size - len(idx))  # fixed batch shape
      length = bucket_length(max(len(r) for r in batch_rows), max_length)
      ids_BxL, mask_BxL = self.tokenizer.pad(batch_rows, length)
      in_flight.admit()
      in_flight.add((idx, _embed_jit(self.params, ids_BxL, mask_BxL, self.cfg)))
      if progress and time.time() - last_report > 5:
        last_report = time.time()
        done = min(b + batch_size, len(order))
        print(f"embedded {done}/{len(order)} texts ({done / (last_report - start):.0f}/s)",
              file=sys.stderr, flush=True)
    in_flight.drain()
    return out_NxD
