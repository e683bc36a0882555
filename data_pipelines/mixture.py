"""Weighted mixture of random-access sources → per-host record indices, deterministic and resumable.

Why a hand-written sampler and not grain's `MapDataset.mix`/`shuffle`: the whole sampling decision for
global step t is a pure function of (seed, t, per-source consumed counts). So
- resume is exact from a tiny JSON state (step + one counter per source), whatever happened before;
- every host computes the same *global* plan and keeps its own slice of rows, so hosts' streams are
  disjoint and together cover the data, and the global batch does not depend on the number of hosts;
- per-source epochs are shuffled with a keyed Feistel permutation, computed lazily per index, so a
  160M-record source never materialises a 1.3 GB permutation array.
Randomness comes from a counter-based hash (splitmix64) of (seed, step, row, ...), never from a stateful
generator, so no generator state needs checkpointing.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping

import numpy as np

# Pairs sampled per source in mE5 stage 1 (report Table 1): the default weights.
REPORT_COUNTS = {
    "wikipedia": 150e6, "mc4": 160e6, "cc_news": 160e6, "nllb": 160e6, "reddit": 160e6,
    "s2orc": 50e6, "stackexchange": 50e6, "xp3": 80e6, "sbert": 10e6,
}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 6
# Salts keep the hash streams for different decisions independent.
SALT_ROW_SOURCE, SALT_BATCH_SOURCE, SALT_EPOCH = 1, 2, 3


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: a bijective, well-mixing uint64 → uint64 map (wrapping: call under
  np.errstate(over="ignore"))."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def hash64(*parts) -> np.ndarray:
  """Hash of non-negative integers (scalars or broadcastable arrays) → uint64 array."""
  h = np.zeros((), np.uint64)
  with np.errstate(over="ignore"):
    for p in parts:
      h = _mix64(h ^ (np.asarray(p, dtype=np.uint64) + _GOLDEN))
  return h


def uniform(*parts) -> np.ndarray:
  """Counter-based uniform floats in [0, 1) from the top 53 bits of hash64(parts)."""
  return (hash64(*parts) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def name_key(name: str) -> int:
  """A source's stable hash key: its permutations don't change when other sources come or go."""
  return zlib.crc32(name.encode("utf-8"))


def permute(positions: np.ndarray, n, *key) -> np.ndarray:
  """The keyed random permutation of range(n), evaluated at `positions` (each in [0, n)); `n` and the key's
  parts may be arrays matching `positions` (one permutation per element's (n, key): a batch's sources and
  epochs in one call).

  A balanced Feistel network permutes [0, 4^h) ⊇ [0, n); cycle-walking (re-encrypting values ≥ n)
  restricts it to a bijection on [0, n). Cost is O(len(positions)), independent of n.
  """
  x = np.asarray(positions, np.uint64).reshape(-1)
  n_X = np.broadcast_to(np.asarray(n, np.uint64), x.shape)
  # h = ceil(bit_length(max(n - 1, 1)) / 2), at least 1; frexp's exponent is the bit length (n < 2^53).
  half_X = np.maximum(1, -(-np.frexp(np.maximum(n_X, 2).astype(np.float64) - 1)[1] // 2)).astype(np.uint64)
  mask_X = (np.uint64(1) << half_X) - np.uint64(1)
  keys_RxX = np.stack([np.broadcast_to(hash64(*key, r), x.shape) for r in range(_FEISTEL_ROUNDS)])

  def encrypt(x, at):
    shift, mask = half_X[at], mask_X[at]
    left, right = x >> shift, x & mask
    for k in keys_RxX[:, at]:
      left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << shift) | right

  with np.errstate(over="ignore"):
    out = encrypt(x, np.arange(len(x)))
    outside = np.flatnonzero(out >= n_X)
    while len(outside):
      out[outside] = encrypt(out[outside], outside)
      outside = outside[out[outside] >= n_X[outside]]
  return out.astype(np.int64).reshape(np.shape(positions))


def mixture_probs(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None,
                  alpha: float = 1.0) -> dict[str, float]:
  """Sampling probability per source: p_i ∝ w_i ** alpha.

  weights=None uses the report's sampled counts for known source names and a source's size for others
  (e.g. stage-2 datasets or the Bible demo), i.e. "each record once per epoch". An explicit mapping must
  name every source and nothing else; alpha < 1 flattens the mixture towards small sources.
  """
  unknown = sorted(set(weights or {}) - set(sizes))
  if unknown:
    raise ValueError(f"mixture weight for unknown source {unknown[0]!r} (sources: {sorted(sizes)})")
  if weights is None:
    weights = {name: REPORT_COUNTS.get(name, size) for name, size in sizes.items()}
  missing = sorted(set(sizes) - set(weights))
  if missing:
    raise ValueError(f"source {missing[0]!r} has no mixture weight (weights given for {sorted(weights)})")
  for name, w in weights.items():
    if not w >= 0:
      raise ValueError(f"mixture weight for {name!r} must be >= 0, got {w}")
    if w > 0 and sizes[name] == 0:
      raise ValueError(f"source {name!r} is empty but has mixture weight {w}")
  raw = {name: float(weights[name]) ** alpha if weights[name] > 0 else 0.0 for name in sizes}
  total = sum(raw.values())
  if total <= 0:
    raise ValueError("all mixture weights are zero")
  return {name: w / total for name, w in raw.items()}


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
  """How records are drawn. global_batch_size counts all hosts' rows."""
  global_batch_size: int
  seed: int = 0
  weights: Mapping[str, float] | None = None  # None: report counts / source sizes, see mixture_probs
  alpha: float = 1.0  # smoothing exponent, p_i ∝ w_i ** alpha
  same_source_batches: bool = False  # every global batch from a single source, chosen by weight


@dataclasses.dataclass(frozen=True)
class Plan:
  """One host's rows of one global batch: row r is record `indices[r]` of source `names[sources[r]]`."""
  step: int
  rows: np.ndarray  # int64 [b]: global row numbers (host-independent randomness keys on these)
  sources: np.ndarray  # int64 [b]: index into MixtureSampler.names
  indices: np.ndarray  # int64 [b]: record index within that source


class MixtureSampler:
  """Deterministic global plans, sliced per host; state = step + per-source consumed counts."""

  def __init__(self, sizes: Mapping[str, int], cfg: MixtureConfig, process_index: int = 0,
               process_count: int = 1):
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % process_count:
      raise ValueError(f"global_batch_size={cfg.global_batch_size} must be a positive multiple of "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    self.cfg = cfg
    self.names = sorted(sizes)
    self.sizes = np.array([sizes[n] for n in self.names], np.int64)
    probs = mixture_probs(sizes, cfg.weights, cfg.alpha)
    self.probs = np.array([probs[n] for n in self.names])
    self._cum = np.cumsum(self.probs)
    self._cum[-1] = 1.0
    self._name_keys = np.array([name_key(n) for n in self.names], np.int64)
    self.local_batch_size = cfg.global_batch_size // process_count
    self._local = slice(process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size)
    self.step = 0
    self.consumed = np.zeros(len(self.names), np.int64)

  def _choose(self, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.names) - 1)

  def next_plan(self) -> Plan:
    """Advances one global step and returns this host's slice of it."""
    b, seed = self.cfg.global_batch_size, self.cfg.seed
    rows_B = np.arange(b, dtype=np.int64)
    if self.cfg.same_source_batches:
      src_B = np.full(b, self._choose(uniform(seed, SALT_BATCH_SOURCE, self.step)), np.int64)
    else:
      src_B = self._choose(uniform(seed, SALT_ROW_SOURCE, self.step, rows_B)).astype(np.int64)
    # Position of each row in its source's stream: consumed count + rank among this batch's rows.
    pos_B = np.empty(b, np.int64)
    for s in np.unique(src_B):
      rows_s = np.flatnonzero(src_B == s)
      pos_B[rows_s] = self.consumed[s] + np.arange(len(rows_s))
      self.consumed[s] += len(rows_s)
    src_b, pos_b = src_B[self._local], pos_B[self._local]
    epoch_b, within_b = np.divmod(pos_b, self.sizes[src_b])
    idx_b = permute(within_b, self.sizes[src_b], seed, SALT_EPOCH, self._name_keys[src_b], epoch_b)
    plan = Plan(self.step, rows_B[self._local], src_b, idx_b)
    self.step += 1
    return plan

  def epochs(self) -> dict[str, float]:
    """Passes made over each source so far (fractional), e.g. for the training log."""
    return {n: float(c) / max(int(s), 1) for n, c, s in zip(self.names, self.consumed, self.sizes)}

  def get_state(self) -> dict:
    """JSON-serialisable and identical on every host."""
    return {"step": self.step,
            "consumed": {n: int(c) for n, c in zip(self.names, self.consumed)},
            "sizes": {n: int(s) for n, s in zip(self.names, self.sizes)}}

  def set_state(self, state: Mapping) -> None:
    sizes = {n: int(s) for n, s in zip(self.names, self.sizes)}
    if dict(state["sizes"]) != sizes:
      raise ValueError(f"iterator state is for sources {dict(state['sizes'])}, this pipeline has {sizes}")
    self.step = int(state["step"])
    self.consumed = np.array([int(state["consumed"][n]) for n in self.names], np.int64)
