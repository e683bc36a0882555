"""Records → the train step's batch: read-time checks, prefixes / instruct template, hard-negative choice,
tokenization, padding to a few bucket lengths (DESIGN.md "Batch contract").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from data_pipelines.batch import hash_ragged, is_packed, slots_per_row
from data_pipelines.mixture import hash64
from data_pipelines.pretokenized import Pretokenizer
from me5_jax.tokenize import (PASSAGE_PREFIX, QUERY_PREFIX, Tokenizer, instruct_query, pad_ragged, ragged,
                              ragged_positions)

# Symmetric pair types (translations): "query: " on both sides, as the model card asks for bitext, and as
# the evaluation harness embeds both columns.
SYMMETRIC_SOURCES = ("nllb", "bible")
SALT_NEGATIVES = 11
CLIP_CHARS_PER_TOKEN = 4  # texts longer than this many characters per allowed token get clip_words
Text = Union[str, tuple[str, Sequence[int]]]  # a prefixed text, or (prefix, ids stored at build time)


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` below max_length, then max_length: 128 → (32, 64, 128)."""
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket that holds n tokens (rows were truncated to the largest, so one always does)."""
  return next(b for b in buckets if b >= n)


def pack_texts(lengths: Sequence[int], row_length: int, max_segments: int) -> tuple[np.ndarray, np.ndarray]:
  """First-fit decreasing: (row_T, segment_T), text t being row row_T[t]'s segment_T[t]-th text; a row's
  lengths sum to ≤ row_length, ≤ max_segments texts per row. Longest texts first, ties by index, so the
  layout is a function of the lengths alone.

  Texts of one length are placed together, in one array step: first fit puts them, in order, into the rows
  that can take one, in row order, each row taking as many as its room and free segments allow (a row
  before the current one never regains room), then into new rows. This is the text-by-text result.
  """
  lengths_T = np.asarray(lengths, np.int64).reshape(-1)
  if lengths_T.size and lengths_T.max() > row_length:
    raise ValueError(f"a text of {lengths_T.max()} tokens does not fit packed rows of {row_length}")
  num_texts = len(lengths_T)
  row_T, segment_T = np.empty(num_texts, np.int64), np.empty(num_texts, np.int64)
  room_R, free_R = np.empty(num_texts, np.int64), np.empty(num_texts, np.int64)  # free tokens, segments
  rows = 0  # open rows: room_R[:rows], free_R[:rows]
  order = np.lexsort((np.arange(num_texts), -lengths_T))
  sorted_lengths = lengths_T[order]
  starts = np.flatnonzero(np.diff(sorted_lengths, prepend=-1)).tolist()
  for start, end, n in zip(starts, starts[1:] + [num_texts], sorted_lengths[starts].tolist()):
    texts = order[start:end]
    fits_R = np.minimum(room_R[:rows] // n, free_R[:rows]) if n else free_R[:rows]  # how many each row takes
    taken_R = np.cumsum(fits_R)
    placed = min(len(texts), int(taken_R[-1]) if rows else 0)
    if placed:
      j = np.arange(placed)
      at = np.searchsorted(taken_R, j, side="right")
      row_T[texts[:placed]] = at
      segment_T[texts[:placed]] = max_segments - free_R[at] + j - (taken_R - fits_R)[at]
      placed_R = np.bincount(at, minlength=rows)
      free_R[:rows] -= placed_R
      room_R[:rows] -= n * placed_R
    if placed < len(texts):  # the rest opens rows that each take `per_row` of them
      rest = np.arange(len(texts) - placed)
      per_row = min(row_length // n if n else max_segments, max_segments)
      row_T[texts[placed:]], segment_T[texts[placed:]] = rows + rest // per_row, rest % per_row
      new = -(-len(rest) // per_row)
      last = len(rest) - per_row * (new - 1)  # the last new row may take fewer
      free_R[rows:rows + new], room_R[rows:rows + new] = max_segments - per_row, row_length - n * per_row
      free_R[rows + new - 1], room_R[rows + new - 1] = max_segments - last, row_length - n * last
      rows += new
  return row_T, segment_T


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How records become token batches.

  stage 1: (query, passage) pairs, G = 1, no teacher scores. stage 2: G = 1 + num_hard_negatives,
  teacher_scores [B, G]. prefixes maps a source to (query prefix, passage prefix), overriding the
  defaults ("query: "/"passage: ", or "query: " on both sides for SYMMETRIC_SOURCES). With instruct=True
  queries become `Instruct: {task}\\nQuery: {q}` (task from the record, else instructions[source]) and
  passages get no prefix. Buckets default to bucket_lengths(max length). pack_rows=True packs queries and
  passages together into rows of max(max lengths) tokens (see Batcher), the row count rounded up to a
  multiple of row_multiple (the batch shards a host feeds). use_teacher=False drops
  teacher_scores (stage 2 without distillation), so records without scores (NaN, as built when the input
  had none) are usable; with it on they are counted as "no_teacher_score".
  """
  stage: int = 1
  max_query_length: int = 128
  max_passage_length: int = 128
  num_hard_negatives: int = 0
  use_teacher: bool = True
  instruct: bool = False
  instructions: Mapping[str, str] = dataclasses.field(default_factory=dict)
  prefixes: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  query_buckets: tuple[int, ...] | None = None
  passage_buckets: tuple[int, ...] | None = None
  pack_rows: bool = False
  row_multiple: int = 1

  def __post_init__(self):
    if self.stage not in (1, 2):
      raise ValueError(f"stage must be 1 or 2, got {self.stage}")
    if self.stage == 1 and self.num_hard_negatives:
      raise ValueError("stage-1 pairs have no hard negatives: num_hard_negatives must be 0")
    for name, buckets, limit in (("query_buckets", self.query_buckets, self.max_query_length),
                                 ("passage_buckets", self.passage_buckets, self.max_passage_length)):
      if buckets is not None and (list(buckets) != sorted(buckets) or buckets[-1] != limit):
        raise ValueError(f"{name}={buckets} must be increasing and end at the max length {limit}")

  @property
  def group_size(self) -> int:
    return 1 + self.num_hard_negatives

  def prefix_pair(self, source: str) -> tuple[str, str]:
    if source in self.prefixes:
      return self.prefixes[source]
    symmetric = source.split("/")[0] in SYMMETRIC_SOURCES  # "bible/demo" is a Bible pair set
    return (QUERY_PREFIX, QUERY_PREFIX) if symmetric else (QUERY_PREFIX, PASSAGE_PREFIX)

  def query_prefix(self, record: Mapping, source: str) -> str:
    """What goes before the query: its E5 prefix, or the instruct template up to the query."""
    if self.instruct:
      return instruct_query(record.get("task") or self.instructions[source], "")
    return self.prefix_pair(source)[0]

  def passage_prefix(self, source: str) -> str:
    return "" if self.instruct else self.prefix_pair(source)[1]

  def query_text(self, record: Mapping, source: str) -> str:
    return self.query_prefix(record, source) + record["query"]

  def passage_text(self, text: str, source: str) -> str:
    return self.passage_prefix(source) + text


def _is_text(x) -> bool:
  return isinstance(x, str)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_record(record: Mapping, source: str, cfg: PreprocessConfig, texts: Sequence[str] | None = None
                 ) -> str | None:
  """Why a record can't be used (a reason to count), or None. Builders already filter (the reasons shared
  with data_pipelines.records.REASONS mean the same); this catches what slipped through or was written by
  other tools, plus what only the read side can judge: no_negatives, no_teacher_score, no_task. `texts`:
  the text fields to check (default: the stage's)."""
  if texts is None:
    texts = ("query", "passage") if cfg.stage == 1 else ("query", "positive")
  for key in texts:
    text = record.get(key)
    if text is None:
      return "missing_field"
    if not _is_text(text):
      return "non_string"
    if not text.strip():
      return "empty_text"
  if cfg.stage == 2:
    for key in ("negatives", "positive_score", "negative_scores"):
      if record.get(key) is None:
        return "missing_field"
    negatives, scores = record["negatives"], record["negative_scores"]
    if not isinstance(negatives, (list, tuple)):
      return "bad_negatives"
    if not all(_is_text(n) for n in negatives):
      return "non_string"
    if not all(n.strip() for n in negatives):
      return "empty_text"
    if not _is_number(record["positive_score"]) or not isinstance(scores, (list, tuple)) \
        or not all(_is_number(s) for s in scores):
      return "bad_score"
    if len(scores) != len(negatives):
      return "bad_score"
    if cfg.use_teacher and not all(math.isfinite(s) for s in (record["positive_score"], *scores)):
      return "no_teacher_score"
    if cfg.num_hard_negatives and not negatives:
      return "no_negatives"
  if cfg.instruct and not ((record.get("task") or "").strip() or cfg.instructions.get(source)):
    return "no_task"
  return None


def choose_negatives(num_available: int, k: int, seed: int, step: int, row: int) -> np.ndarray:
  """Up to k of a record's negatives, without replacement, keyed by (seed, step, global row) so the choice
  is reproducible on resume and independent of the host count."""
  keys = hash64(seed, SALT_NEGATIVES, step, row, np.arange(num_available))
  return np.argsort(keys, kind="stable")[:k]


def clip_words(text: str, max_words: int) -> str:
  """`text` up to the whitespace after its first max_words words (all of it when it has fewer).

  Tokenizers split on whitespace before the subword model runs, and every word gives at least one token,
  so tokenizing this prefix and truncating to max_words tokens gives the same ids as tokenizing the whole
  text: a 5,000-word mC4 page then costs a 128-word tokenization. Only the first text in a whitespace-free
  script (Chinese, Japanese, Thai) is not shortened. Rows that still come out shorter than the limit
  (words the normalizer erases entirely) are re-tokenized from the full text by the caller.
  """
  parts = text.split(maxsplit=max_words)
  if len(parts) <= max_words:
    return text
  return text[:len(text) - len(parts[-1])].rstrip()


def pad_score(record: Mapping) -> float:
  """Teacher score for a random in-corpus passage filling a missing hard-negative slot: the teacher never
  scored it, so it gets the record's lowest negative score (a random passage is at most as relevant as the
  worst mined one). Records with no negatives at all are rejected ("no_negatives") rather than given an
  invented score on an unknown scale."""
  return float(min(record["negative_scores"]))


class Batcher:
  """Tokenizes formatted texts into the batch dict; `agree_length` lets hosts agree on one bucket.

  A text is a string (prefix included), tokenized here, or a (prefix, ids) pair of ids stored at build
  time, which only gets its prefix and special tokens (`data_pipelines.pretokenized`: the same ids).

  Padded layout (DESIGN.md "Batch contract"): query_ids/mask [B, Lq], passage_ids/mask [B, G, Lp].
  Packed layout (cfg.pack_rows): all B·(1+G) texts packed into `packed_ids`/`packed_segments` [R, L]
  (segment s + 1 of a row is the row's s-th text, 0 is padding), `query_slots` [B] and `passage_slots`
  [B, G] giving each text's index into the [R_global · S] slot list the encoder returns
  (encoder.embed_packed). On the demo's Bible pairs this encodes 1.12× the real tokens instead of 3.1× when
  every row pads to a bucket over the batch's longest text (benchmarks/demo_step.py). `process_index` offsets the slots: every host packs its own rows
  into the same agreed R, and host h's rows come h-th in the global array.
  """

  def __init__(self, tokenizer: Tokenizer, cfg: PreprocessConfig,
               agree_length: Callable[[str, int], int] | None = None, process_index: int = 0):
    self.tokenizer, self.cfg = tokenizer, cfg
    self.query_buckets = cfg.query_buckets or bucket_lengths(cfg.max_query_length)
    self.passage_buckets = cfg.passage_buckets or bucket_lengths(cfg.max_passage_length)
    self.agree_length, self.process_index = agree_length, process_index
    self.pretokenizer = None  # made on the first pre-tokenized text

  def _ragged(self, items: list[Text], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Every item's row, truncated to max_length, as one flat int32 array, row after row, and the rows'
    lengths. Texts are tokenized; (prefix, ids) items only get their prefix and special tokens, a whole
    batch at a time (Pretokenizer.ragged)."""
    kinds = set(map(type, items))  # a batch's texts are usually all one kind
    if str not in kinds:
      return self._pretokenizer().ragged(items, max_length)
    if kinds == {str}:
      return ragged(self._tokenized(items, max_length))
    texts = [i for i, item in enumerate(items) if isinstance(item, str)]
    stored = [i for i, item in enumerate(items) if not isinstance(item, str)]
    return _interleave([(at, self._ragged([items[i] for i in at], max_length)) for at in (texts, stored)],
                       len(items))

  def _pretokenizer(self):
    if self.pretokenizer is None:
      self.pretokenizer = Pretokenizer(self.tokenizer)
    return self.pretokenizer

  def _tokenized(self, texts: list[str], max_length: int) -> list[list[int]]:
    if not texts:
      return []
    # Clipping is only worth a Python call for texts that may hold more words than max_length.
    clipped = [clip_words(t, max_length) if len(t) > CLIP_CHARS_PER_TOKEN * max_length else t for t in texts]
    rows = self.tokenizer.token_ids(clipped, max_length)
    short = [i for i, (t, c, r) in enumerate(zip(texts, clipped, rows)) if c is not t and len(r) < max_length]
    for i, r in zip(short, self.tokenizer.token_ids([texts[i] for i in short], max_length)):
      rows[i] = r
    return rows

  def _padded(self, tokens_K: np.ndarray, lengths_N: np.ndarray, buckets: Sequence[int]):
    """Ragged rows padded to the smallest bucket that holds them all: (ids_NxL, mask_NxL)."""
    length = pick_bucket(int(lengths_N.max(initial=1)), buckets)
    return pad_ragged(tokens_K, lengths_N, self.tokenizer.pad_id, length)

  def __call__(self, queries: list[Text], passages: list[Text], teacher_BxG: np.ndarray | None = None):
    """queries: B texts; passages: B·G texts, row-major (row i's group is passages[i·G:(i+1)·G])."""
    batch = self.local(queries, passages, teacher_BxG)
    if self.agree_length is not None:
      batch = agree_shapes(batch, self.agree_length, self.process_index, self.tokenizer.pad_id)
    return batch

  def local(self, queries: list[Text], passages: list[Text], teacher_BxG: np.ndarray | None = None):
    """The batch in this host's own shapes (its bucket lengths, its packed rows), before `agree_shapes`:
    what read workers build (data_pipelines.read_workers), while agreeing stays with the caller."""
    b, g = len(queries), self.cfg.group_size
    if self.cfg.pack_rows:
      return self._packed(queries, passages, teacher_BxG)
    query_ids, query_mask = self._padded(*self._ragged(queries, self.cfg.max_query_length), self.query_buckets)
    tokens_K, lengths_N = self._ragged(passages, self.cfg.max_passage_length)
    ids_NxL, mask_NxL = self._padded(tokens_K, lengths_N, self.passage_buckets)
    batch = {"query_ids": query_ids, "query_mask": query_mask,
             "passage_ids": ids_NxL.reshape(b, g, -1), "passage_mask": mask_NxL.reshape(b, g, -1),
             "passage_hash": hash_ragged(tokens_K, lengths_N).reshape(b, g, 2)}
    if teacher_BxG is not None:
      batch["teacher_scores"] = np.asarray(teacher_BxG, np.float32).reshape(b, g)
    return batch

  def _packed(self, queries: list[Text], passages: list[Text], teacher_BxG: np.ndarray | None) -> dict:
    cfg, b, g = self.cfg, len(queries), self.cfg.group_size
    q_tokens, q_lengths = self._ragged(queries, cfg.max_query_length)
    p_tokens, p_lengths = self._ragged(passages, cfg.max_passage_length)
    ids_RxL, segments_RxL, slots_T = pack_ragged(
        np.concatenate([q_tokens, p_tokens]), np.concatenate([q_lengths, p_lengths]),
        max(cfg.max_query_length, cfg.max_passage_length), self.tokenizer.pad_id, cfg.row_multiple,
        self.process_index)
    batch = {"packed_ids": ids_RxL, "packed_segments": segments_RxL, "query_slots": slots_T[:b],
             "passage_slots": slots_T[b:].reshape(b, g),
             "passage_hash": hash_ragged(p_tokens, p_lengths).reshape(b, g, 2)}
    if teacher_BxG is not None:
      batch["teacher_scores"] = np.asarray(teacher_BxG, np.float32).reshape(b, g)
    return batch


def agree_shapes(batch: dict, agree_length: Callable[[str, int], int], process_index: int, pad_id: int) -> dict:
  """`batch` (Batcher.local) padded to the lengths all hosts agree on: agree_length(kind, local) for "query"
  and "passage" lengths, or "rows" for the packed layout, whose slots then move with this host's rows
  (host h's rows come h-th in the global array, so they start at h · agreed rows)."""
  out = dict(batch)

  def pad(key, axis, to, value):
    widths = [(0, 0)] * batch[key].ndim
    widths[axis] = (0, to - batch[key].shape[axis])
    out[key] = np.pad(batch[key], widths, constant_values=value)

  if is_packed(batch):
    rows, row_length = batch["packed_ids"].shape
    agreed = agree_length("rows", rows)
    pad("packed_ids", 0, agreed, pad_id)
    pad("packed_segments", 0, agreed, 0)
    shift = process_index * (agreed - rows) * slots_per_row(row_length)
    out["query_slots"], out["passage_slots"] = batch["query_slots"] + shift, batch["passage_slots"] + shift
    return out
  for kind, ids, mask in (("query", "query_ids", "query_mask"), ("passage", "passage_ids", "passage_mask")):
    length = agree_length(kind, batch[ids].shape[-1])
    pad(ids, -1, length, pad_id)
    pad(mask, -1, length, 0)
  return out


def pack_token_rows(ids_TxW: np.ndarray, mask_TxW: np.ndarray, row_length: int, pad_id: int,
                    row_multiple: int = 1, process_index: int = 0):
  """`pack_ragged` of token rows padded as `Tokenizer.pad` gives them."""
  keep_TxW = np.asarray(mask_TxW).astype(bool)
  return pack_ragged(np.asarray(ids_TxW)[keep_TxW], keep_TxW.sum(1), row_length, pad_id, row_multiple,
                     process_index)


def pack_ragged(tokens_K: np.ndarray, lengths_T: np.ndarray, row_length: int, pad_id: int, row_multiple: int = 1,
                process_index: int = 0):
  """T texts' rows, one flat array of their tokens, text after text, and their lengths → (ids_RxL,
  segments_RxL, slots_T): the packed layout of Batcher, R a multiple of row_multiple (before
  `agree_shapes`); slot t = (global row of text t) · S + its segment − 1. Texts are placed with array
  operations over all tokens at once."""
  lengths_T = np.asarray(lengths_T, np.int64)
  num_slots = slots_per_row(row_length)
  row_T, segment_T = pack_texts(lengths_T, row_length, num_slots)
  num_rows = -(-int(row_T.max(initial=-1) + 1) // row_multiple) * row_multiple
  # A row's texts sit one after another from column 0, so the texts' tokens in layout order (row by row,
  # segment by segment) fill each row's first `used` columns, in row-major order.
  order_O = np.lexsort((segment_T, row_T))
  used_R = np.bincount(row_T, weights=lengths_T, minlength=num_rows).astype(np.int64)
  filled_RxL = np.arange(row_length) < used_R[:, None]
  ids_RxL = np.full((num_rows, row_length), pad_id, np.int32)
  segments_RxL = np.zeros((num_rows, row_length), np.int32)
  lengths_O = lengths_T[order_O]
  starts_O = (np.cumsum(lengths_T) - lengths_T)[order_O]  # where each text's tokens start in tokens_K
  ids_RxL[filled_RxL] = tokens_K[ragged_positions(starts_O, lengths_O)]
  segments_RxL[filled_RxL] = np.repeat(segment_T[order_O] + 1, lengths_O)
  slots_T = ((process_index * num_rows + row_T) * num_slots + segment_T).astype(np.int32)
  return ids_RxL, segments_RxL, slots_T


def _interleave(parts: Sequence[tuple[Sequence[int], tuple[np.ndarray, np.ndarray]]], n: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Ragged rows (tokens, lengths) of disjoint subsets of n items, each with its items' positions, → the
  ragged rows of all n items in position order (a batch mixing tokenized texts and stored ids)."""
  lengths_N = np.zeros(n, np.int64)
  for at, (_, lengths) in parts:
    lengths_N[list(at)] = lengths
  starts_N = np.cumsum(lengths_N) - lengths_N
  tokens_K = np.empty(int(lengths_N.sum()), np.int32)
  for at, (tokens, lengths) in parts:
    tokens_K[ragged_positions(starts_N[list(at)], lengths)] = tokens
  return tokens_K, lengths_N
